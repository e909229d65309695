"""benchmarks/common.py's floors count the right parameters: every expert of a MoE for its size,
the top-k experts for its FLOPs, and for the bytes of a step only the experts its tokens reach
(issue 18: MoE decode is measured against active-expert bytes). Checked against the parameters of
the abstract models themselves and the published sizes."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import common
from jaxserve.sharding import ShardingRules, make_mesh
from jaxserve.weights import abstract_model
from models import config_from_hf
from models.presets import get_preset


def _config_and_count(name: str):
    cfg = config_from_hf(get_preset(name))
    _, abstract, _ = abstract_model(cfg, np.dtype("bfloat16"), make_mesh(1), ShardingRules())
    return cfg, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))


@pytest.mark.parametrize("name, total_b, active_b", [
    ("llama-3-8b", 8.03, 8.03), ("qwen2-7b", 7.62, 7.62), ("mixtral-8x7b", 46.7, 12.9),
    ("qwen3-30b-a3b", 30.5, 3.3)])
def test_parameter_counts_match_the_models(name, total_b, active_b):
    cfg, counted = _config_and_count(name)
    assert common.param_count(cfg) == counted  # every leaf of the model, nothing else
    # as published (Qwen3-30B-A3B's "3.3B activated" is 3.35B with its embeddings)
    assert common.param_count(cfg) / 1e9 == pytest.approx(total_b, abs=0.06)
    assert common.active_params(cfg) / 1e9 == pytest.approx(active_b, abs=0.06)


def test_step_bytes_follow_the_experts_reached():
    cfg, _ = _config_and_count("mixtral-8x7b")
    always, expert, sparse = common.param_split(cfg)
    assert sparse == cfg.num_layers and expert == sparse * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    one = common.weight_bytes_read(cfg, 2, 1)
    assert one == 2 * (always + cfg.num_experts_per_tok * expert)  # one token: its top-2
    assert one < common.weight_bytes_read(cfg, 2, 4) < common.weight_bytes_read(cfg, 2, 256)
    assert common.weight_bytes_read(cfg, 2, 256) == pytest.approx(2 * common.param_count(cfg))
    dense, _ = _config_and_count("llama-3-8b")
    assert (common.weight_bytes_read(dense, 2, 1) == common.weight_bytes_read(dense, 2, 512)
            == 2 * common.param_count(dense))


def _wave_floor(mc, n, i, o, bw, fl):
    """The issues' formula written out for one wave: prefill, then o decode steps of n sequences."""
    kv, act = common.kv_bytes_per_token(mc, 2), common.active_params(mc)
    attn = 4 * mc.num_layers * mc.num_q_heads * mc.head_dim
    t = max((common.weight_bytes_read(mc, 2, n * i) + n * i * kv) / bw,
            (2 * act * n * i + attn * n * i * i / 2) / fl)
    for s in range(o):
        t += max((common.weight_bytes_read(mc, 2, n) + n * (i + s) * kv) / bw,
                 (2 * act * n + attn * n * (i + s)) / fl)
    return t


def test_requests_floor_of_one_length_is_the_wave_formula():
    cfg, _ = _config_and_count("llama-3-8b")
    bw, fl = 4.3e12, 8.2e14
    f = common.workload_floor(cfg, 2, num_prompts=64, input_len=100, output_len=20, batch=64,
                              bandwidth=bw, flops=fl)
    assert f["seconds"] == pytest.approx(_wave_floor(cfg, 64, 100, 20, bw, fl), rel=1e-9)
    assert f["decode_steps"] == 20
    # two waves when the batch holds half: twice the one-wave time of 32
    f2 = common.workload_floor(cfg, 2, num_prompts=64, input_len=100, output_len=20, batch=32,
                               bandwidth=bw, flops=fl)
    assert f2["decode_steps"] == 40
    assert f2["decode_seconds"] == pytest.approx(
        2 * (_wave_floor(cfg, 32, 100, 20, bw, fl) - f2["prefill_seconds"] / 2), rel=1e-6)
    # kernels one after another never take less than the overlapped max; memory-bound batches of
    # 64 take the same, workload B's 1,000 (matmul-bound and KV-bound at once) clearly more
    assert f["serial_seconds"] == pytest.approx(f["seconds"])
    b = common.workload_floor(cfg, 2, num_prompts=1000, input_len=512, output_len=256,
                              batch=1024, bandwidth=bw, flops=fl)
    assert b["serial_seconds"] > 1.2 * b["seconds"]


def test_mixed_lengths_pay_their_tail():
    """One long output among short ones: its last steps run at batch 1, still reading every
    weight, so the floor is slower than the floor of the mean lengths."""
    cfg, _ = _config_and_count("llama-3-8b")
    bw, fl = 4.3e12, 8.2e14
    lengths = [(100, 10)] * 63 + [(100, 640)]  # mean output 19.8
    mixed = common.requests_floor(cfg, 2, lengths, batch=64, bandwidth=bw, flops=fl)
    mean = common.workload_floor(cfg, 2, num_prompts=64, input_len=100, output_len=20, batch=64,
                                 bandwidth=bw, flops=fl)
    assert mixed["decode_steps"] == 640
    assert mixed["output_tokens_per_s"] < 0.5 * mean["output_tokens_per_s"]
    # the 630 batch-1 steps each read all the weights at least once
    assert mixed["decode_seconds"] > 630 * common.weight_bytes_read(cfg, 2, 1) / bw


def test_quantized_floors_count_the_bytes_stored():
    """fp8 weights (half the bytes of bf16) and an fp8 KV cache (1 byte an element): a batch-1
    decode step, bound by bytes, takes half the time of the bf16 one."""
    cfg, _ = _config_and_count("llama-3-8b")
    bw, fl = 4.3e12, 8.2e14
    bf16 = common.requests_floor(cfg, 2, [(128, 128)], batch=1, bandwidth=bw, flops=fl)
    fp8 = common.requests_floor(cfg, 2, [(128, 128)], batch=1, bandwidth=bw, flops=fl,
                                weight_ratio=0.5, kv_itemsize=1)
    assert fp8["decode_seconds"] == pytest.approx(bf16["decode_seconds"] / 2, rel=1e-6)
