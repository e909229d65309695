"""Start-up lowering (issue 14): benchmarks.startup_trace on a tiny preset, the warm-up order, and
the step lowering one decoder-layer function (and one sampler) shared by the layers."""
from __future__ import annotations

import json
import re

import pytest

from benchmarks import startup_trace

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


def test_step_lowers_one_layer_function_called_per_layer():
    """The layers share one traced body: a jit of their own, lowered once per step shape."""
    runner = _runner()
    args, prompt_k = runner._inputs(runner._padding_batch(16), full_sampler=True)
    text = runner._lower(args, prompt_k).as_text()
    assert len(re.findall(r"func\.func private @decoder_layer\b", text)) == 1
    assert len(re.findall(r"call @decoder_layer\b", text)) == TINY["num_hidden_layers"]
    assert len(re.findall(r"func\.func private @sample\b", text)) == 1


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="no-such-model"):
        startup_trace.abstract_runner("no-such-model", max_num_seqs=8, max_num_batched_tokens=8,
                                      max_model_len=64)
