"""benchmarks/host_step.py at a tiny size (issues 14 and 15): the engine's host path runs with the
device taken out, and its JSON has every row (sampling setting x batch size) and every phase."""
import json

from benchmarks import host_step
from jaxserve.checkpoint import embedded_gguf_path


def test_host_step_smoke(tmp_path):
    result = host_step.main(["--tokenizer", embedded_gguf_path(), "--num-seqs", "4", "8",
                             "--steps", "3", "--min-prompt", "20", "--max-prompt", "40",
                             "--max-tokens", "12", "--max-num-batched-tokens", "256",
                             "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "host_step.json").read_text())
    assert (tmp_path / "host_step.png").stat().st_size > 0
    assert saved["phases"] == list(host_step.PHASES)
    assert set(saved["rows"]) == {f"{row} @ {n}" for row in host_step.ROWS for n in (4, 8)}
    for name, row in saved["rows"].items():
        assert set(row["phases_ms"]) == set(host_step.PHASES), name
        assert row["host_ms_per_step"] > 0 and row["tokens_per_step"] > 0, name
        assert row["phases_ms"]["schedule"] > 0 and row["phases_ms"]["update"] > 0, name
    json_row = saved["rows"]["50% JSON schema @ 8"]["phases_ms"]
    assert json_row["grammar_masks"] > 0 and json_row["grammar_advance"] > 0
    assert saved["rows"]["greedy @ 8"]["phases_ms"]["grammar_masks"] == 0
    assert result["rows"].keys() == saved["rows"].keys()
