"""gpu_memory_utilization reaches JAX's allocator (XLA_PYTHON_CLIENT_MEM_FRACTION) before the backend
starts, never overrides a fraction the user set, and cannot once the backend runs."""
from __future__ import annotations

import os
import subprocess
import sys

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
