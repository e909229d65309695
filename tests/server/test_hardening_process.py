"""`jaxserve serve` processes that must end: a hung device step (fault injection) trips the
--step-timeout watchdog (in the engine core process, or the thread of --engine-in-process) and
the server exits non-zero instead of wedging; a second SIGTERM during the drain exits at once and
cleanly (it used to die by SIGABRT, exit code -6)."""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from jaxserve.server.cli import EXIT_ENGINE_DEAD
from tests.server.conftest import start_cli


def _stream(base: str, started: threading.Event, results: list) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 120, "n": 2, "stream": True,
            "ignore_eos": True}
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as resp:
            for _ in resp.iter_lines():
                started.set()
        results.append(resp.status_code)
    except httpx.HTTPError as e:  # the forced exit cuts streams: expected
        results.append(type(e).__name__)


@pytest.mark.parametrize("mode", [(), ("--engine-in-process",)], ids=["core", "in-process"])
def test_hung_step_trips_the_watchdog_and_the_server_exits(tiny_model_dir, mode):
    proc, base = start_cli(tiny_model_dir, "--step-timeout", "5", *mode,
                           env={"JAXSERVE_FAULT_INJECT": "hang:SLEEPY"})
    try:
        ok = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 3},
                        timeout=60)
        assert ok.status_code == 200
        start = time.monotonic()
        hung = httpx.post(base + "/v1/completions", json={"prompt": "SLEEPY", "max_tokens": 3},
                          timeout=60)
        assert hung.status_code == 500 and hung.json()["error"]["code"] == "engine_dead"
        assert "Timeout" not in hung.json()["error"]["message"]  # no internal text
        assert proc.wait(30) == EXIT_ENGINE_DEAD
        print(f"hung step: 500 and exit {EXIT_ENGINE_DEAD} {time.monotonic() - start:.1f}s later")
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert "has not returned" in output and "terminate called" not in output


def test_second_sigterm_during_the_drain_exits_cleanly(tiny_model_dir):
    proc, base = start_cli(tiny_model_dir, "--drain-timeout", "60")
    try:
        results: list = []
        events = [threading.Event() for _ in range(8)]
        threads = [threading.Thread(target=_stream, args=(base, ev, results)) for ev in events]
        for t in threads:
            t.start()
        for ev in events:
            assert ev.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.wait(30)
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert code == 0, output[-3000:]
    assert "terminate called" not in output
    assert time.monotonic() - signalled < 20
