"""gpu_memory_utilization reaches JAX's allocator (XLA_PYTHON_CLIENT_MEM_FRACTION) before the backend
starts, never overrides a fraction the user set, and cannot once the backend runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import os, jax
from jaxserve.startup import reserve_device_memory
{before}
reserve_device_memory(0.85)
print(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
"""


def _run(before: str = "", env: dict | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(before=before)], text=True,
                         capture_output=True, env={**base, **(env or {})}, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_fraction_set_before_the_backend_starts():
    assert _run() == "0.8500"


def test_a_user_fraction_wins():
    assert _run(env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}) == "0.5"


def test_too_late_once_the_backend_runs():
    assert _run(before="jax.devices()") == "None"


class _Device:
    def __init__(self, platform: str, bytes_limit: int | None):
        self.platform, self._limit = platform, bytes_limit

    def memory_stats(self):
        return None if self._limit is None else {"bytes_limit": self._limit, "bytes_in_use": 0}


def test_batch_defaults_by_device():
    """vLLM's defaults: offline on an accelerator with >= 70 GiB (at gpu_memory_utilization of it),
    1024 sequences and 16384 tokens a step; the server, smaller devices and CPUs 256 and 2048;
    what the user set is kept."""
    from jaxserve.config import EngineConfig
    from jaxserve.startup import batch_defaults

    h200 = _Device("gpu", int(0.9 * (139 << 30)))  # JAX's limit there: 0.9 of the device
    a10 = _Device("gpu", int(0.9 * (22 << 30)))
    assert batch_defaults(EngineConfig(), h200) == (1024, 16384)
    assert batch_defaults(EngineConfig(usage_context="server"), h200) == (256, 2048)
    assert batch_defaults(EngineConfig(), a10) == (256, 2048)
    assert batch_defaults(EngineConfig(), _Device("cpu", 1 << 40)) == (256, 2048)
    assert batch_defaults(EngineConfig(), _Device("gpu", None)) == (256, 2048)
    assert batch_defaults(EngineConfig(max_num_seqs=64), h200) == (64, 16384)
    assert batch_defaults(EngineConfig(max_num_batched_tokens=512), a10) == (256, 512)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)


def test_start_up_logs_the_pool_in_sequences_of_max_model_len(tmp_path, caplog):
    """The KV pool line says how many sequences of max_model_len fit at once (issue 14)."""
    import logging

    from jaxserve import LLM
    from tests.engine.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny")
    with caplog.at_level(logging.INFO, logger="jaxserve"):
        LLM(str(model), dtype="float32", page_size=4, num_kv_pages=70, max_model_len=64,
            max_num_seqs=8)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV cache:")]
    assert "70 pages of 4 tokens (280 tokens" in line
    assert "holds 4 sequences of max_model_len" in line  # 70 // (64 / 4)


def test_an_accelerator_without_a_memory_limit(monkeypatch):
    """XLA's VMM allocator (command-buffer update mode SKIP_TEMP) reports no bytes_limit: sizing the
    pool from the CPU budget gave an H200 a 1.8 GiB pool (seen 2026-11-29). The device's total
    (nvidia-smi) times gpu_memory_utilization sizes it instead; with neither, a clear error, and
    num_kv_pages still works."""
    from jaxserve import startup
    from jaxserve.config import EngineConfig
    from models import config_from_hf
    from models.presets import get_preset

    mc = config_from_hf(get_preset("llama-3-8b"))
    vmm = [_Device("gpu", None)]
    monkeypatch.setattr(startup, "gpu_total_bytes", lambda: None)
    with pytest.raises(ValueError, match="num_kv_pages"):
        startup.num_kv_pages_for(EngineConfig(), mc, "bfloat16", 1024, vmm)
    assert startup.num_kv_pages_for(EngineConfig(num_kv_pages=500), mc, "bfloat16", 1024,
                                    vmm) == 500
    assert startup.num_kv_pages_for(EngineConfig(), mc, "bfloat16", 1024,
                                    [_Device("cpu", None)]) > 0
    monkeypatch.setattr(startup, "gpu_total_bytes", lambda: 139 << 30)
    sized = EngineConfig(max_num_seqs=1024, max_num_batched_tokens=16384)
    with_stats = startup.num_kv_pages_for(sized, mc, "bfloat16", 1024,
                                          [_Device("gpu", int(0.9 * (139 << 30)))])
    assert with_stats > 50_000  # ~100 GiB of 128 KiB pages
    assert startup.num_kv_pages_for(sized, mc, "bfloat16", 1024, vmm) == with_stats
    assert startup.batch_defaults(EngineConfig(), vmm[0]) == (1024, 16384)
