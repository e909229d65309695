"""LoRA pieces without an engine: the per-token delta implementations against the gather
reference, PEFT adapter reading (layouts, scales, errors naming the bad value), the slot table,
the prefix hash per adapter, and A/B sharded like their base weights."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.lora import (NO_LORA_SLOT, LoRARequest, LoRASlots, load_peft_adapter,
                           lora_model_config)
from jaxserve.pages import hash_page
from models.lora import lora_delta

CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16,
                  intermediate_size=24, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=4,
                  max_loras=3, max_lora_rank=8)


@pytest.mark.parametrize("impl", ["dense", "ragged", "auto"])
def test_lora_delta_matches_reference(impl):
    rng = np.random.default_rng(0)
    S, T, I, R, O = 3, 13, 16, 8, 12
    x = jnp.asarray(rng.standard_normal((T, I)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((S, I, R)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((S, R, O)), jnp.float32)
    # unsorted slots, base-model tokens (NO_LORA_SLOT) and a slot number past S mixed in
    slots = jnp.asarray([2, 0, NO_LORA_SLOT, 1, 2, 2, 0, 3, NO_LORA_SLOT, 1, 0, 2, 1], jnp.int32)
    want = lora_delta(x, a, b, slots, impl="reference")
    got = jax.jit(lora_delta, static_argnames="impl")(x, a, b, slots, impl=impl)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert not np.any(np.asarray(want)[[2, 7, 8]])  # no adapter: zero delta
    for t in (0, 1, 3):  # the obvious formula per token
        s = int(slots[t])
        np.testing.assert_allclose(want[t], x[t] @ a[s] @ b[s], atol=1e-4, rtol=1e-5)


def test_lora_delta_refuses_bad_shapes():
    with pytest.raises(ValueError, match="impl='bgmv'"):
        lora_delta(jnp.zeros((2, 4)), jnp.zeros((1, 4, 2)), jnp.zeros((1, 2, 3)),
                   jnp.zeros(2, jnp.int32), impl="bgmv")
    with pytest.raises(ValueError, match="LoRA shapes disagree"):
        lora_delta(jnp.zeros((2, 4)), jnp.zeros((1, 4, 2)), jnp.zeros((1, 3, 3)),
                   jnp.zeros(2, jnp.int32))


def _write_adapter(path, tensors: dict, dtype=np.float32, **config):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: np.asarray(v).astype(dtype) for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    return str(path)


def _pair(layer: int, module: str, fan_in: int, fan_out: int, r: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    name = f"base_model.model.model.layers.{layer}.{module}"
    return {f"{name}.lora_A.weight": rng.standard_normal((r, fan_in)),
            f"{name}.lora_B.weight": rng.standard_normal((fan_out, r))}


def test_peft_layouts_and_scales(tmp_path):
    """Our layouts give PEFT's delta: x @ W^T gains scale * x @ A^T @ B^T, per projection."""
    t = {**_pair(0, "self_attn.q_proj", 16, 16), **_pair(1, "self_attn.k_proj", 16, 8, seed=1),
         **_pair(0, "self_attn.o_proj", 16, 16, seed=2), **_pair(1, "mlp.down_proj", 24, 16, seed=3)}
    path = _write_adapter(tmp_path / "a", t, alpha_pattern={"down_proj": 2})
    w = load_peft_adapter(path, CFG)
    assert set(w) == {"layers.0.attn.q_lora", "layers.1.attn.k_lora", "layers.0.attn.o_lora",
                      "layers.1.mlp.down_lora"}
    rng = np.random.default_rng(5)
    for ours, hf, scale in [("layers.0.attn.q_lora", "layers.0.self_attn.q_proj", 2.0),
                            ("layers.1.attn.k_lora", "layers.1.self_attn.k_proj", 2.0),
                            ("layers.0.attn.o_lora", "layers.0.self_attn.o_proj", 2.0),
                            ("layers.1.mlp.down_lora", "layers.1.mlp.down_proj", 0.5)]:
        A = t[f"base_model.model.model.{hf}.lora_A.weight"]
        B = t[f"base_model.model.model.{hf}.lora_B.weight"]
        a, b = w[ours]
        assert a.shape[-1] == b.shape[0] == CFG.max_lora_rank  # rank 4 padded to 8
        x = rng.standard_normal(A.shape[1])
        want = scale * (B @ (A @ x))
        got = np.tensordot(np.tensordot(x.reshape(a.shape[:-1]), a, a.ndim - 1), b, 1)
        np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-5, atol=1e-6)
    rs = load_peft_adapter(_write_adapter(tmp_path / "rs", _pair(0, "self_attn.q_proj", 16, 16),
                                          use_rslora=True), CFG)
    # rsLoRA: alpha / sqrt(r) = 8 / 2 = 4, twice PEFT's alpha / r = 2 for the same tensors
    np.testing.assert_allclose(rs["layers.0.attn.q_lora"][1], 2 * w["layers.0.attn.q_lora"][1],
                               rtol=1e-6)


def test_bf16_adapter(tmp_path):
    import ml_dtypes

    t = _pair(0, "mlp.up_proj", 16, 24)
    bf16 = load_peft_adapter(_write_adapter(tmp_path / "bf", t, ml_dtypes.bfloat16), CFG)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in t.items()}
    f32 = load_peft_adapter(_write_adapter(tmp_path / "f32", rounded), CFG)
    for x, y in zip(bf16["layers.0.mlp.up_lora"], f32["layers.0.mlp.up_lora"]):
        np.testing.assert_array_equal(x, y)


def test_kv_heads_replicated_for_tensor_parallel(tmp_path):
    path = _write_adapter(tmp_path / "kv", _pair(0, "self_attn.v_proj", 16, 8))
    cfg = CFG.with_kv_replication(4)  # 2 HF kv heads stored twice each
    b = load_peft_adapter(path, cfg)["layers.0.attn.v_lora"][1]  # [R, K=4, H]
    np.testing.assert_array_equal(b[:, 0], b[:, 1])
    np.testing.assert_array_equal(b[:, 2], b[:, 3])


@pytest.mark.parametrize("tensors, config, match", [
    (_pair(0, "self_attn.q_proj", 16, 16, r=12), {"r": 12}, "rank 12 of .*q_proj exceeds "
                                                             "max_lora_rank=8"),
    (_pair(0, "self_attn.q_proj", 32, 16), {}, r"another base model\?"),
    (_pair(5, "self_attn.q_proj", 16, 16), {}, "past the base model's 2 layers"),
    ({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 16))}, {}, "lm_head"),
    (_pair(0, "self_attn.q_proj", 16, 16), {"use_dora": True}, "use_dora=True"),
    (_pair(0, "self_attn.q_proj", 16, 16), {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({k: v for k, v in _pair(0, "mlp.up_proj", 16, 24).items() if "lora_A" in k}, {},
     "lacks lora_B"),
])
def test_bad_adapters_name_the_problem(tmp_path, tensors, config, match):
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(_write_adapter(tmp_path / "bad", tensors, **config), CFG)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft_adapter(str(tmp_path), CFG)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_peft_adapter(str(tmp_path), CFG)
    with pytest.raises(ValueError, match="not 'Gemma2ForCausalLM'"):
        lora_model_config(ModelConfig(**{**CFG.__dict__, "architecture": "Gemma2ForCausalLM"}),
                          max_loras=1, max_lora_rank=8)


def test_slot_table_pins_and_evicts_lru():
    slots = LoRASlots(2)
    a, b, c = (LoRARequest(n, i, "/x") for i, n in enumerate("abc", 1))
    assert slots.acquire(a) == 0 and slots.acquire(a) == 0 and slots.acquire(b) == 1
    assert sorted(s for s, _ in slots.take_stale()) == [0, 1]
    assert not slots.can_acquire(3)  # both pinned: c waits
    slots.release(1)
    assert not slots.can_acquire(3)  # a still has one user
    slots.release(1)
    assert slots.can_acquire(3) and slots.acquire(c) == 0  # a's slot, now idle, is evicted
    assert slots.take_stale() == [(0, c)]
    slots.release(2)
    assert slots.acquire(b) == 1 and slots.take_stale() == []  # still loaded: no rewrite
    slots.release(3)
    assert not slots.forget(2) and slots.forget(3)  # b is pinned, c idle: unloaded
    assert slots.can_acquire(4) and slots.acquire(LoRARequest("d", 4, "/x")) == 0
    slots.check_integrity()


def test_page_hash_separates_adapters():
    tokens = [1, 2, 3, 4]
    assert hash_page(None, tokens) == hash_page(None, tokens, 0)
    assert len({hash_page(None, tokens, i) for i in range(3)}) == 3


def test_lora_params_shard_like_their_weights():
    """Under a 4-way model axis, A/B split on the base weight's sharded dims (heads, ffw)."""
    from flax import nnx

    from jaxserve.sharding import ShardingRules, make_mesh
    from models.llama import Llama

    mesh = make_mesh(4)
    cfg = lora_model_config(CFG.with_kv_replication(4), max_loras=2, max_lora_rank=8)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(ShardingRules().as_pairs()):
        model = nnx.eval_shape(lambda: Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
        specs = nnx.get_partition_spec(nnx.state(model))
    attn, mlp = specs["layers"][0]["attn"], specs["layers"][0]["mlp"]
    spec = lambda v: tuple(v.get_value())  # noqa: E731
    assert spec(attn["q_lora"]["a"]) == (None, None, None)
    assert spec(attn["q_lora"]["b"]) == (None, None, "model", None)
    assert spec(attn["o_lora"]["a"]) == (None, "model", None, None)
    assert spec(mlp["down_lora"]["a"]) == (None, "model", None)
    assert spec(mlp["up_lora"]["b"]) == (None, None, "model")
