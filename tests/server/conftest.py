"""One in-process `jaxserve serve` (uvicorn thread on 127.0.0.1) over the tiny Llama, shared by the
server tests; the load test's offline references are generated on the same engine before serving.
"""
from __future__ import annotations

import os
import contextlib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.engine.tiny import build_tiny_llama

MODEL = "tiny"
# Engine limits for every server test (also passed to the CLI in test_cli.py).
ENGINE_KW = dict(dtype="float32", max_model_len=128, max_num_seqs=32, num_kv_pages=512,
                 max_num_batched_tokens=256)
LOAD_PROMPTS = [f"{head} {i}" for i in range(10) for head in (
    "The capital of France is", "Once upon a time", "def add(a, b):", "你好，请介绍一下")]
LOAD_MAX_TOKENS = 12


@dataclass
class Served:
    base_url: str  # http://127.0.0.1:PORT
    app: object  # the Gate (app.serving: OpenAIServing) for tests that flip limits
    model_dir: Path
    reference: dict[str, str]  # LOAD_PROMPTS -> greedy text from LLM.generate on this engine

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=30)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=60, **kw)

    def gauges(self) -> dict[str, float]:
        """The /metrics gauges this suite checks, parsed from the Prometheus text."""
        out = {}
        for line in self.get("/metrics").text.splitlines():
            for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
                if line.startswith(f"vllm:{name}{{"):
                    out[name] = float(line.rsplit(" ", 1)[1])
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            gauges = self.gauges()
            if not any(gauges.values()) or time.monotonic() > deadline:
                return gauges
            time.sleep(0.05)


@contextlib.contextmanager
def override(obj, **kw):
    """Set attributes of a live object (the app, its serving) for one test, then restore them."""
    old = {k: getattr(obj, k) for k in kw}
    for k, v in kw.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli(model_dir: Path, *flags: str, env: dict[str, str] | None = None,
              scheme: str = "http") -> tuple[subprocess.Popen, str]:
    """`jaxserve serve` on the tiny model as a subprocess (ENGINE_KW limits); waits for /health."""
    port = free_port()
    engine_flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_KW.items()]
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", str(model_dir), "--port", str(port),
           *engine_flags, *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    base = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(base + "/health", timeout=1, verify=False).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)


def core_pids(server_pid: int) -> list[int]:
    """The server's spawned engine cores (its children running multiprocessing's spawn_main)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            pids.append(int(entry))
    return pids


@contextlib.contextmanager
def serve_in_thread(engine, thread_name: str = "uvicorn", on_dead=None):
    """build_app over `engine` (an LLMEngine, EngineCoreClient or DataParallelClient) served by
    uvicorn in a daemon thread on a free 127.0.0.1 port; yields (base_url, app) once it listens,
    and on exit asks the server to stop and joins its thread (the engine is the caller's)."""
    from jaxserve.server.cli import make_server
    from jaxserve.server.openai import build_app
    from jaxserve.server.serving import ServerConfig

    app = build_app(engine, ServerConfig(served_model_names=(MODEL,)), on_dead=on_dead)
    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port, drain_timeout=5,
                         log_level="warning", access_log=False)
    thread = threading.Thread(target=server.run, name=thread_name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_server_llama"))


@pytest.fixture(scope="session")
def served(tiny_model_dir):
    from jaxserve import LLM, SamplingParams

    llm = LLM(str(tiny_model_dir), **ENGINE_KW)
    params = SamplingParams(temperature=0.0, max_tokens=LOAD_MAX_TOKENS)
    outs = llm.generate(LOAD_PROMPTS, params, use_tqdm=False)  # also compiles the batch buckets
    reference = {p: o.outputs[0].text for p, o in zip(LOAD_PROMPTS, outs)}
    with serve_in_thread(llm.llm_engine) as (base_url, app):
        yield Served(base_url, app, tiny_model_dir, reference)


@pytest.fixture
def client(served):
    import openai

    return openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)
