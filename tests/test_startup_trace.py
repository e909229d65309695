"""Start-up lowering (issue 14): benchmarks.startup_trace on a tiny preset, the warm-up order, and
the steps of a bucket sharing one lowering of the decoder layer."""
from __future__ import annotations

import gc
import json
import re

import pytest

from benchmarks import startup_trace
from jaxserve.warmup import paused_gc
from models import layers

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


def _runner():
    return startup_trace.abstract_runner("llama-3-8b", max_num_seqs=8, max_num_batched_tokens=32,
                                         max_model_len=64, hf_overrides=TINY)


def test_script_times_every_warmup_shape_and_writes_json(tmp_path, capsys):
    startup_trace.main(["--model", "llama-3-8b", "--hf-overrides", json.dumps(TINY),
                        "--max-num-seqs", "8", "--max-num-batched-tokens", "16",
                        "--max-model-len", "64", "--profile", "--profile-top", "20",
                        "--out", str(tmp_path), "--name", "tiny"])
    result = json.loads((tmp_path / "tiny.json").read_text())
    shapes = [(r["tokens"], r["sampler"]) for r in result["rows"]]
    assert shapes == [(16, "full"), (8, "full"), (16, "plain"), (8, "plain")]
    assert all(r["lower_s"] > 0 and r["trace_s"] > 0 for r in result["rows"])
    assert result["summary"]["shapes"] == 4
    assert "cumulative" in result["profile_top"]
    assert "(_lower)" in capsys.readouterr().out  # the profile names where lowering went


def test_warmup_lowers_the_longest_compiles_first():
    runner = _runner()
    assert runner.buckets == (8, 16, 32)
    assert runner.warmup_shapes() == [(32, True), (16, True), (8, True),
                                      (32, False), (16, False), (8, False)]


def test_steps_of_a_bucket_share_one_lowered_layer():
    """Both sampler variants of a token bucket call one exported decoder layer (lowered once for
    all layers and both steps), and each step lowers its sampler once."""
    runner = _runner()
    layers._exported.clear()
    for full in (True, False):
        args, prompt_k = runner._inputs(runner._padding_batch(16), full_sampler=full)
        text = runner._lower(args, prompt_k).as_text()
        calls = re.findall(r"call @call_exported_decoder_layer", text)
        assert len(calls) == TINY["num_hidden_layers"]
        assert len(re.findall(r"func\.func private @sample\b", text)) == 1
    assert len(layers._exported) == 1 and None not in layers._exported.values()


def test_layer_with_the_gpu_kernel_exports_for_cuda():
    """The Pallas GPU attention kernel (Mosaic GPU) lowered for cuda on this CPU-only host: the
    layer exports (its custom call allowed), rather than falling back to a lowering per step."""
    runner = startup_trace.abstract_runner(
        "llama-3-8b", max_num_seqs=8, max_num_batched_tokens=8, max_model_len=256,
        attention_impl="pallas_gpu", hf_overrides={**TINY, "hidden_size": 256,
                                                   "num_attention_heads": 2,
                                                   "num_key_value_heads": 1})  # head_dim 128
    layers._exported.clear()
    rows = startup_trace.time_lowering(startup_trace.lower_for(runner, "cuda"))
    assert [(r["tokens"], r["sampler"]) for r in rows] == [(8, "full"), (8, "plain")]
    assert len(layers._exported) == 1 and None not in layers._exported.values()


def test_paused_gc_leaves_the_collector_as_it_found_it():
    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="no-such-model"):
        startup_trace.abstract_runner("no-such-model", max_num_seqs=8, max_num_batched_tokens=8,
                                      max_model_len=64)
