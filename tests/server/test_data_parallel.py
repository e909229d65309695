"""Issue 19: `--data-parallel-size 2`, two engine-core processes behind one server (CPU).

40 concurrent greedy streams give LLM.generate's text and both replicas get work; killing one
replica mid-run fails only its streams (an engine_dead error event, then [DONE]) while the others
finish with the greedy text and later requests are served by the survivor; killing the last one
runs on_dead (the CLI exits 3). Plus the router's pick (least loaded, ties round-robin) and each
replica's devices (replica_env) without processes.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from jaxserve.server.dp_router import DataParallelClient, replica_env
from tests.server.conftest import (ENGINE_KW, LOAD_MAX_TOKENS, LOAD_PROMPTS, MODEL, core_pids,
                                   serve_in_thread)


@pytest.fixture(scope="module")
def dp_served(served):
    """A server over DataParallelClient with 2 replicas; yields (base_url, client, dead list)."""
    from jaxserve.config import EngineConfig

    client = DataParallelClient.launch(EngineConfig(model=str(served.model_dir),
                                                    data_parallel_size=2, **ENGINE_KW))
    dead: list = []
    with serve_in_thread(client, "uvicorn-dp", on_dead=lambda: dead.append(True)) as (base, _):
        yield base, client, dead
    client.stop()


async def _stream(http: httpx.AsyncClient, body: dict, first: asyncio.Event | None = None):
    """(text, finish_reason, error code or None) of one streamed completion."""
    text, finish, error = [], None, None
    async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                return "".join(text), finish, error
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                error = data["error"]["code"]
                continue
            for c in data["choices"]:
                text.append(c["text"])
                finish = c["finish_reason"] or finish
            if first is not None:
                first.set()
    raise AssertionError("no [DONE]")


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_greedy_streams_equal_offline_on_both_replicas(dp_served, served):
    base, client, dead = dp_served
    body = {"model": MODEL, "max_tokens": LOAD_MAX_TOKENS, "temperature": 0}

    async def run():
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=180) as http:
            return await asyncio.gather(*[_stream(http, {**body, "prompt": p})
                                          for p in LOAD_PROMPTS])

    routed_before = list(client.routed)
    results = asyncio.run(run())
    assert len(results) == len(LOAD_PROMPTS) == 40
    for prompt, (text, finish, error) in zip(LOAD_PROMPTS, results):
        assert error is None and finish and text == served.reference[prompt], prompt
    routed = [after - before for after, before in zip(client.routed, routed_before)]
    assert sum(routed) == 40 and min(routed) >= 10, routed  # least-loaded balances them
    models = httpx.get(base + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    deadline = time.monotonic() + 30  # aggregated gauges drain to zero, counters add up
    while _metric(base, "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(base, "vllm:num_requests_running") == 0.0
    assert _metric(base, "vllm:request_prefill_time_seconds_count") >= 40
    assert not dead


def test_killed_replica_fails_only_its_streams(dp_served, served):
    base, client, dead = dp_served
    body = {"model": MODEL, "max_tokens": 100, "temperature": 0}

    async def run():
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=180) as http:
            firsts = [asyncio.Event() for _ in LOAD_PROMPTS]
            tasks = [asyncio.create_task(_stream(http, {**body, "prompt": p}, ev))
                     for p, ev in zip(LOAD_PROMPTS, firsts)]
            deadline = time.monotonic() + 120  # mid-run: tokens flow, the victim holds work
            while not (any(ev.is_set() for ev in firsts)
                       and client.replicas[1].num_unfinished >= 5):
                assert time.monotonic() < deadline, "no stream started"
                await asyncio.sleep(0.002)
            on_victim = client.replicas[1].num_unfinished
            client.replicas[1].process.kill()
            return on_victim, await asyncio.gather(*tasks)

    on_victim, results = asyncio.run(run())
    failed = [r for r in results if r[2] is not None]
    done = [(p, r) for p, r in zip(LOAD_PROMPTS, results) if r[2] is None]
    assert on_victim > 0 and 0 < len(failed) <= on_victim and len(done) == 40 - len(failed)
    assert {r[2] for r in failed} == {"engine_dead"}
    print(f"killed replica 1 holding {on_victim} requests: {len(failed)} failed, {len(done)} done")
    for prompt, (text, finish, _) in done:  # the survivor's streams: greedy text to the end
        assert finish in ("stop", "length") and text.startswith(served.reference[prompt]), prompt
    # The server keeps serving on replica 0 and stays healthy.
    assert httpx.get(base + "/health", timeout=30).status_code == 200 and not dead
    ok = httpx.post(base + "/v1/completions", timeout=60,
                    json={"model": MODEL, "prompt": LOAD_PROMPTS[0], "temperature": 0,
                          "max_tokens": LOAD_MAX_TOKENS}).json()
    assert ok["choices"][0]["text"] == served.reference[LOAD_PROMPTS[0]]
    # Without any replica the server is dead: on_dead runs (the CLI exits 3), /health is 503.
    client.replicas[0].process.kill()
    deadline = time.monotonic() + 30
    while not dead and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead == [True]
    assert httpx.get(base + "/health", timeout=30).status_code == 503


class _FakeReplica:
    def __init__(self, load: int):
        self.num_unfinished = load


def test_pick_least_loaded_then_round_robin():
    router = DataParallelClient.__new__(DataParallelClient)
    router.replicas = [_FakeReplica(3), _FakeReplica(1), _FakeReplica(1)]
    router._lock, router._live = threading.Lock(), [0, 1, 2]
    import itertools

    router._next = itertools.count()
    assert [router.pick() for _ in range(4)] == [1, 2, 1, 2]
    router.replicas[2].num_unfinished = 5
    assert router.pick() == 1
    router._live = [0, 2]  # replica 1 died
    assert router.pick() == 0


class _DeadOnAdd(_FakeReplica):
    """A replica whose core died before acknowledging (what EngineCoreClient.add raises)."""

    def __init__(self):
        super().__init__(0)
        self.error = RuntimeError("engine core exited with code -9")

    async def add(self, items):
        from jaxserve.server.async_engine import DEAD_MESSAGE, EngineDeadError

        raise EngineDeadError(DEAD_MESSAGE)


class _Alive(_FakeReplica):
    error = None

    async def add(self, items):
        return _FakeReplica(0)  # a stand-in RequestStream (weak-referenceable)


def test_request_unacknowledged_by_a_dead_replica_goes_to_another():
    import itertools
    import weakref

    router = DataParallelClient.__new__(DataParallelClient)
    router.replicas = [_DeadOnAdd(), _Alive(3)]
    router._lock, router._live, router._next = threading.Lock(), [0, 1], itertools.count()
    router._owner, router.routed, router.error = weakref.WeakKeyDictionary(), [0, 0], None
    dead = []
    router.on_dead = lambda: dead.append(True)
    stream = asyncio.run(router.add([("r", {"prompt": "x"}, None)]))
    assert router._owner[stream] == 1 and router.routed == [0, 1]
    assert router._live == [1] and not dead  # replica 0 left the rotation, the server lives


def test_replica_env_gives_each_replica_its_own_devices():
    gpu = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert [replica_env(r, 2, gpu)["CUDA_VISIBLE_DEVICES"] for r in (0, 1)] == ["4,5", "6,7"]
    assert [replica_env(r, 1, {})["CUDA_VISIBLE_DEVICES"] for r in (0, 1, 2)] == ["0", "1", "2"]
    assert replica_env(1, 2, {"JAX_PLATFORMS": "cpu"}) == {"JAXSERVE_DP_RANK": "1"}
    with pytest.raises(ValueError, match="replica 1 needs tensor_parallel_size=2"):
        replica_env(1, 2, {"CUDA_VISIBLE_DEVICES": "0,1,2"})


def test_data_parallel_size_is_refused_by_one_engine():
    from jaxserve.config import EngineConfig
    from jaxserve.startup import build_engine_parts

    with pytest.raises(ValueError, match="data_parallel_size=0"):
        EngineConfig(model=None, data_parallel_size=0)
    with pytest.raises(ValueError, match="data_parallel_size=2 runs replicas behind"):
        build_engine_parts(EngineConfig(model=None, data_parallel_size=2))


def test_cli_serves_on_a_survivor_and_exits_3_without_replicas(tiny_model_dir):
    """`jaxserve serve --data-parallel-size 2`: two cores; one killed, it still answers; both
    killed, it exits EXIT_ENGINE_DEAD."""
    from jaxserve.server.cli import EXIT_ENGINE_DEAD
    from tests.server.conftest import start_cli

    proc, base = start_cli(tiny_model_dir, "--data-parallel-size", "2")
    try:
        pids = core_pids(proc.pid)
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(1.0)
        body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        for _ in range(3):  # every one routed to the survivor
            assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 200
        assert httpx.get(base + "/health", timeout=30).status_code == 200
        os.kill(pids[1], signal.SIGKILL)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert code == EXIT_ENGINE_DEAD, output[-3000:]
    assert "data-parallel replica 1 died" in output or "data-parallel replica 0 died" in output
