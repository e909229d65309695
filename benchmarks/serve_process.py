"""The served engine a benchmark run talks to (benchmarks/serving.py): `jaxserve serve` in a
subprocess (--launch), started on a free loopback port, yielded once /health answers, drained and
stopped afterwards; and its prefix cache reset between runs."""
from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


@contextlib.contextmanager
def launched_server(serve_args: str, log_path: Path, timeout: float):
    """`python -m jaxserve.cli serve ARGS` on a free loopback port; yields its base URL once
    /health answers 200; SIGTERM (drain) on exit, then kill if it lingers."""
    with socket.socket() as sock:  # a free port (the server binds it a moment later)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", *shlex.split(serve_args),
           "--host", "127.0.0.1", "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            t0 = time.monotonic()
            while not _healthy(base):
                if proc.poll() is not None or time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"server exited ({proc.returncode}) or not healthy after "
                                       f"{timeout:.0f}s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            print(f"server up at {base} after {time.monotonic() - t0:.1f}s (log {log_path})")
            yield base
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def _healthy(base: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(base + "/health", timeout=2).status_code == 200
    return False


async def reset_prefix_cache(client: httpx.AsyncClient) -> bool:
    """POST /reset_prefix_cache (jaxserve; vLLM in dev mode) so no run finds an earlier run's (or
    the warm-up's) prompts cached. Retries while the server finishes the last requests (409)."""
    for _ in range(50):
        resp = await client.post("/reset_prefix_cache")
        if resp.status_code != 409:
            break
        await asyncio.sleep(0.1)
    if resp.status_code != 200:
        print(f"warning: /reset_prefix_cache answered {resp.status_code}: a run may hit prompts "
              "cached by the warm-up or an earlier rate")
    return resp.status_code == 200
