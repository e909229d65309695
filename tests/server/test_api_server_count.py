"""`jaxserve serve --api-server-count 2`: two API server processes on one port, one engine core.

Over the CLI (tiny model): 64 concurrent greedy streams equal LLM.generate, both processes served
some (their request logs), /metrics of either process counts all 64; killing API server 1 drains
server 0, which exits 1. Killing the core ends every open stream on both processes with an
error event, and the server exits EXIT_ENGINE_DEAD. Runtime LoRA loading is refused with N > 1,
and N < 1 is a ValueError naming it. EngineCore's routing over two clients' pipes, no model.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from jaxserve.server.api_servers import EXIT_API_SERVER_DIED
from jaxserve.server.cli import EXIT_ENGINE_DEAD
from tests.server.conftest import LOAD_MAX_TOKENS, LOAD_PROMPTS, MODEL, start_cli

NUM_STREAMS = 64
TAG = "[api-server-1]"  # API server 1's log lines carry it (server 0's do not)


class Logs:
    """A served subprocess's output, read by a thread (a full pipe would stall the server)."""

    def __init__(self, proc):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc) -> None:
        for line in proc.stdout:
            self.lines.append(line)

    def text(self, join: bool = False) -> str:
        if join:
            self._thread.join(30)
        return "".join(self.lines)

    def pids(self) -> tuple[int, int]:
        """(engine core, API server 1) from server 0's start-up lines."""
        text = self.text()
        core = re.search(r"engine core process (\d+) started", text)
        api = re.search(r"more API server processes serve: pids \[(\d+)\]", text)
        return int(core.group(1)), int(api.group(1))


def _serve(model_dir, *flags: str):
    proc, base = start_cli(model_dir, "--api-server-count=2", "--disable-uvicorn-access-log",
                           "--enable-log-requests", "--served-model-name", MODEL, *flags)
    return proc, base, Logs(proc)


async def _stream(client: httpx.AsyncClient, body: dict, started: asyncio.Event | None = None):
    """Stream a completion: its data lines (the last is [DONE])."""
    lines = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if started is not None:
                    started.set()
    return lines


def _text(lines: list[str]) -> str:
    assert lines[-1] == "[DONE]", lines[-3:]
    return "".join(json.loads(line)["choices"][0]["text"] for line in lines[:-1])


def _metric(base: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(base + "/metrics").text
               .splitlines() if line.startswith(name + "{"))


def _wait_exit(proc, timeout: float = 60.0) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_two_api_servers_serve_streams_as_offline_then_one_dies(tiny_model_dir, served):
    """64 greedy streams at once over 2 API processes equal LLM.generate; each process logged
    requests; /metrics counts all 64 whichever process answers; API server 1 dying makes
    server 0 drain and exit EXIT_API_SERVER_DIED."""
    proc, base, logs = _serve(tiny_model_dir)
    try:
        body = {"model": MODEL, "max_tokens": LOAD_MAX_TOKENS, "temperature": 0}
        prompts = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(NUM_STREAMS)]

        async def run():
            limits = httpx.Limits(max_connections=NUM_STREAMS, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
                return await asyncio.gather(*[_stream(client, {**body, "prompt": p})
                                              for p in prompts])

        results = asyncio.run(run())
        for prompt, lines in zip(prompts, results):
            assert _text(lines) == served.reference[prompt], prompt
        received = [line for line in logs.lines if "Received request" in line]
        mine = [line for line in received if TAG in line]
        assert len(received) == NUM_STREAMS and 0 < len(mine) < NUM_STREAMS, len(mine)
        time.sleep(1.5)  # each process shares its counters every second
        for _ in range(4):  # new connections land on either process: each sums both
            assert _metric(base, "vllm:request_success_total") == NUM_STREAMS
            assert _metric(base, "vllm:generation_tokens_total") == NUM_STREAMS * LOAD_MAX_TOKENS
        _, api_pid = logs.pids()
        os.kill(api_pid, signal.SIGKILL)
        code = _wait_exit(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = logs.text(join=True)
    assert code == EXIT_API_SERVER_DIED, output[-3000:]
    assert "API server process 1 exited" in output
    print(f"{NUM_STREAMS} streams: {len(mine)} served by API server 1")


def test_killed_core_fails_open_streams_on_both_api_servers(tiny_model_dir):
    proc, base, logs = _serve(tiny_model_dir)
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 120,
                "ignore_eos": True}

        async def run():
            async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(
                    max_connections=20, max_keepalive_connections=0)) as client:
                events = [asyncio.Event() for _ in range(16)]
                tasks = [asyncio.create_task(_stream(client, body, ev)) for ev in events]
                await asyncio.wait_for(asyncio.gather(*[ev.wait() for ev in events]), 60)
                core_pid, _ = logs.pids()
                os.kill(core_pid, signal.SIGKILL)
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
        code = _wait_exit(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = logs.text(join=True)
    assert code == EXIT_ENGINE_DEAD, output[-3000:]
    for lines in results:  # every open stream: an error event, then [DONE]
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["error"]["code"] == "engine_dead"
    received = [line for line in output.splitlines() if "Received request" in line]
    assert any(TAG in line for line in received) and not all(TAG in line for line in received)
    dead = [line for line in output.splitlines() if "engine core process exited" in line]
    assert any(TAG in line for line in dead) and not all(TAG in line for line in dead), dead


def test_runtime_lora_loading_is_refused_with_several_api_servers():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from jaxserve.server.lora_adapters import LoRAAdapters, add_lora_routes
    from jaxserve.server.openai import _add_error_handlers

    app = FastAPI()
    _add_error_handlers(app)
    add_lora_routes(app, LoRAAdapters(enabled=True, max_lora_rank=8, base_model=MODEL), 2)
    client = TestClient(app)
    for route, body in (("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"}),
                        ("/v1/unload_lora_adapter", {"lora_name": "a"})):
        resp = client.post(route, json=body)
        assert resp.status_code == 400, resp.text
        assert "--api-server-count 2" in resp.json()["error"]["message"]


def test_api_server_count_below_one_is_refused():
    from jaxserve.server.serving import ServerConfig

    with pytest.raises(ValueError, match="--api-server-count 0"):
        ServerConfig(api_server_count=0)


class _FakeEngine:
    """What EngineCore reads of a CoreEngine, for routing without a model."""

    def __init__(self):
        from types import SimpleNamespace

        self.requests: dict[str, object] = {}
        self.aborted: list[str] = []
        self.output_processor = SimpleNamespace(requests=self.requests)
        self.scheduler = SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0)

    def add_request(self, rid, prompt, params, arrival_time):
        self.requests[rid] = prompt

    def abort_request(self, rids):
        for rid in [rids] if isinstance(rids, str) else rids:
            self.requests.pop(rid, None)
            self.aborted.append(rid)


def test_core_routes_news_to_the_adding_server_and_aborts_a_gone_servers_requests():
    """Two clients' pipes into one EngineCore: each add is acknowledged to its sender, a step's
    deltas go to the server that added each request, and a server that hangs up has its
    requests aborted while the other keeps its own."""
    from multiprocessing import Pipe

    from jaxserve.engine_core import EngineCore

    cmds, outs = [Pipe(duplex=False) for _ in range(2)], [Pipe(duplex=False) for _ in range(2)]
    engine = _FakeEngine()
    core = EngineCore(engine, [c[0] for c in cmds], [o[1] for o in outs])
    for client, rid in ((0, "a"), (1, "b"), (1, "c")):
        cmds[client][1].send(("add", [(rid, {"prompt_token_ids": [1]}, None)], 0.0, 7))
    assert core._read_commands(block=False)  # noqa: SLF001
    for client in (0, 1):
        assert outs[client][0].recv()[:2] == ("applied", [(7, None, None)] * (client + 1))
    deltas = [(rid, [(0, [5], None, None, None, None)], None) for rid in "abc"]  # RequestDelta
    core._send_step(deltas, [], (3, 0, 0.1))  # noqa: SLF001
    assert [d[0] for d in outs[0][0].recv()[1]] == ["a"]
    assert [d[0] for d in outs[1][0].recv()[1]] == ["b", "c"]
    cmds[1][1].close()  # API server 1 is gone
    assert core._read_commands(block=False)  # noqa: SLF001
    assert sorted(engine.aborted) == ["b", "c"] and list(engine.requests) == ["a"]
    cmds[0][1].close()
    assert not core._read_commands(block=False)  # noqa: SLF001 - no server left: stop
    core.flush(timeout=5.0)
