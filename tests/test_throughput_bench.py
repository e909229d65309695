"""benchmarks.throughput's workloads: lognormal mixed lengths, a ShareGPT-format file, and the
whole script on a tiny model with the engine's own batch defaults (issue 14)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from benchmarks import throughput


def _args(**kw):
    base = dict(seed=0, dataset=None, num_prompts=2000, input_len=280, output_len=190,
                range_ratio=0.0, length_dist="lognormal", lognormal_sigma=0.8)
    return SimpleNamespace(**{**base, **kw})


def test_lognormal_lengths_have_the_asked_means():
    data = throughput.make_dataset(_args(), vocab_size=1000)
    ins = np.array([len(p) for p, _ in data])
    outs = np.array([o for _, o in data])
    assert abs(ins.mean() / 280 - 1) < 0.06 and abs(outs.mean() / 190 - 1) < 0.06
    assert ins.min() >= 4 and ins.max() <= 8 * 280 and ins.std() > 100  # mixed, not fixed
    again = throughput.make_dataset(_args(), vocab_size=1000)
    assert [len(p) for p, _ in again] == list(ins)  # seeded


class _WordTokenizer:
    def encode(self, text):
        return [len(w) for w in text.split()]


def _sharegpt(path):
    rows = [{"conversations": [{"from": "human", "value": "one two three four five"},
                               {"from": "gpt", "value": "a b c d e f"}]},
            {"conversations": [{"from": "human", "value": "only a question here"}]},  # no reply
            {"conversations": [{"from": "human", "value": "too short"},
                               {"from": "gpt", "value": "x y z w"}]},  # prompt < 4 tokens
            {"conversations": [{"from": "human", "value": "six seven eight nine ten"},
                               {"from": "gpt", "value": "g h i j k"}]}]
    path.write_text(json.dumps(rows))
    return path


def test_sharegpt_file(tmp_path):
    path = _sharegpt(tmp_path / "sharegpt.json")
    args = _args(dataset=str(path), num_prompts=10, output_len=0)
    pairs = throughput.make_dataset(args, 1000, _WordTokenizer())
    assert pairs == [([3, 3, 5, 4, 4], 6), ([3, 5, 5, 4, 3], 5)]  # reply lengths as outputs


def test_script_on_a_sharegpt_file_with_device_defaults(tmp_path):
    from tests.engine.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny", vocab_size=384)
    path = tmp_path / "sharegpt.json"
    words = ["alpha beta gamma delta epsilon", "zeta eta theta iota kappa lambda"]
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": words[i % 2]},
                                                   {"from": "gpt", "value": words[1 - i % 2]}]}
                                for i in range(6)]))
    throughput.main(["--model", str(model), "--load-format", "auto", "--dtype", "float32",
                     "--dataset", str(path), "--num-prompts", "6", "--output-len", "5",
                     "--max-model-len", "64", "--out", str(tmp_path), "--name", "t", "--profile"])
    result = json.loads((tmp_path / "t.json").read_text())
    res = result["jaxserve"]
    assert res["output_tokens"] == 6 * 5 and res["compiles_during_timed_run"] == 0
    assert res["steps"] >= 5 and res["device_trace"] is not None  # --profile: the traced run
    assert (res["max_num_seqs"], res["max_num_batched_tokens"]) == (256, 2048)  # CPU defaults
    assert result["floor"]["output_tokens_per_s"] > 0
