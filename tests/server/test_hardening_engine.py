"""AsyncEngine's failure handling over a fake engine (no model, no HTTP): a failed step fails only
the requests it ran and the thread keeps serving; repeated failures, a device error or a hung step
(the watchdog) mark the engine dead, fail everyone without internal text, and call on_dead once."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import SimpleNamespace

import pytest

from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.async_engine import (DEAD_MESSAGE, MAX_FAILED_STEPS, AsyncEngine,
                                          EngineDeadError, RequestFailedError)
from jaxserve.server.faults import InjectedDeviceError
from jaxserve.server.metrics import ServerMetrics

SECRET = "secret internal detail"


class FakeEngine:
    """Requests run one step each (prefill+finish); `step()` raises while a running request's
    prompt holds a key of `faults` (the value is the exception, or "hang")."""

    def __init__(self, faults: dict[str, object]):
        self.faults = faults
        self.waiting: list = []
        self.running: list = []
        self.scheduler = SimpleNamespace(running=[], waiting=[], num_running=0, num_waiting=0,
                                         kv_cache_usage=0.0)
        self.aborted: list[str] = []
        self.prompts: dict[str, str] = {}
        self.release = threading.Event()

    def add_request(self, rid, prompt, params, arrival_time=None):
        self.prompts[rid] = prompt["prompt"]
        self.scheduler.waiting.append(SimpleNamespace(request_id=rid))

    def abort_request(self, rids):
        self.aborted.extend(rids)
        keep = [s for s in self.scheduler.running if s.request_id not in rids]
        self.scheduler.running = keep
        self.scheduler.waiting = [s for s in self.scheduler.waiting if s.request_id not in rids]

    def has_unfinished_requests(self):
        return bool(self.scheduler.running or self.scheduler.waiting)

    def step(self):
        sched = self.scheduler
        sched.running += sched.waiting
        sched.waiting = []
        for seq in sched.running:
            for key, fault in self.faults.items():
                if key in self.prompts[seq.request_id]:
                    if fault == "hang":
                        self.release.wait()
                    raise fault
        done, sched.running = sched.running, []
        return [RequestOutput(request_id=s.request_id, prompt=self.prompts[s.request_id],
                              prompt_token_ids=[1], finished=True,
                              outputs=[CompletionOutput(index=0, text="ok", token_ids=[2],
                                                        finish_reason="length")])
                for s in done]


async def _run(engine: AsyncEngine, prompt: str) -> str:
    stream = await engine.add([(prompt, {"prompt": prompt, "prompt_token_ids": [1]},
                                SamplingParams(max_tokens=1))])
    async for out in stream:
        if out.finished:
            return out.outputs[0].text
    raise AssertionError("stream ended unfinished")


def _engine(faults, step_timeout=None):
    fake = FakeEngine(faults)
    engine = AsyncEngine(fake, ServerMetrics("fake"))
    dead = []
    engine.on_dead = lambda: dead.append(True)
    engine.step_timeout = step_timeout
    engine.start()
    return fake, engine, dead


def test_failed_step_fails_its_requests_and_keeps_serving():
    fake, engine, dead = _engine({"POISON": RuntimeError(SECRET)})

    async def main():
        assert await _run(engine, "good-1") == "ok"
        with pytest.raises(RequestFailedError) as info:
            await _run(engine, "POISON-1")
        assert SECRET not in str(info.value) and info.value.code == "internal_error"
        assert "POISON-1" in fake.aborted  # its pages were freed
        # fewer than MAX_FAILED_STEPS in a row, separated by good steps: still serving
        for i in range(MAX_FAILED_STEPS + 1):
            with pytest.raises(RequestFailedError):
                await _run(engine, f"POISON-{i + 2}")
            assert await _run(engine, f"good-{i + 2}") == "ok"

    asyncio.run(main())
    assert engine.error is None and not dead
    engine.stop()


def test_failures_in_a_row_kill_the_engine_without_leaking_text():
    fake, engine, dead = _engine({"POISON": RuntimeError(SECRET)})

    async def main():
        results = await asyncio.gather(*[_run(engine, f"POISON-{i}") for i in range(5)],
                                       return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        for _ in range(MAX_FAILED_STEPS):  # one add per step: MAX_FAILED_STEPS failures in a row
            with contextlib.suppress(EngineDeadError):
                await _run(engine, "POISON-x")
        with pytest.raises(EngineDeadError) as info:  # refused at the door now
            await _run(engine, "good")
        assert str(info.value) == DEAD_MESSAGE and SECRET not in str(info.value)

    asyncio.run(main())
    engine._thread.join(5)  # it calls on_dead after failing the waiters, then ends
    assert engine.error is not None and dead == [True] and not engine.running


def test_device_error_kills_at_once():
    fake, engine, dead = _engine({"BROKEN": InjectedDeviceError(SECRET)})

    async def main():
        with pytest.raises(EngineDeadError) as info:
            await _run(engine, "BROKEN")
        assert type(info.value) is EngineDeadError and SECRET not in str(info.value)

    asyncio.run(main())
    engine._thread.join(5)
    assert dead == [True] and engine.error is not None


def test_watchdog_declares_a_hung_step_dead():
    fake, engine, dead = _engine({"SLEEPY": "hang"}, step_timeout=0.5)

    async def main():
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(_run(engine, "SLEEPY"), 10)

    asyncio.run(main())
    deadline = time.monotonic() + 5  # the watchdog fails the waiters, then calls on_dead
    while not dead and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dead == [True]
    fake.release.set()  # let the stuck thread out; it must stop rather than serve on
    engine._thread.join(5)
    assert not engine.running
