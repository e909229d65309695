"""Issue 20: the engine core in its own process (the default `jaxserve serve`).

Over a served EngineCoreClient: 200 concurrent greedy streams equal LLM.generate (text and
tokens, n=2 and stop strings included); a slow reader gets several tokens per SSE chunk with the
same text; logprobs, echo and a failing step (fault injection) as in-process; the waiting bound
answers 503 + Retry-After; /metrics has queue, prefill and decode time histograms. Over the
CLI: killing the core process mid-stream ends every open stream with an error event and the
server exits EXIT_ENGINE_DEAD.
Plus RequestStream's coalescing on its own (no model).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import threading
import time

import httpx
import pytest

from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.server import faults
from jaxserve.server.async_engine import RequestStream
from jaxserve.server.cli import EXIT_ENGINE_DEAD
from tests.server.conftest import (ENGINE_KW, LOAD_MAX_TOKENS, LOAD_PROMPTS, MODEL, Served,
                                   core_pids, override, serve_in_thread, start_cli)

NUM_STREAMS = 200


@pytest.fixture(scope="module")
def core_served(served):
    """A server whose engine runs in a core process (served.reference: the offline texts)."""
    from jaxserve.config import EngineConfig
    from jaxserve.server.core_client import EngineCoreClient

    os.environ[faults.ENV] = "raise:POISON"  # the core process inherits it
    try:
        client = EngineCoreClient.launch(EngineConfig(model=str(served.model_dir), **ENGINE_KW))
    finally:
        del os.environ[faults.ENV]
    dead = []
    with serve_in_thread(client, "uvicorn-core", on_dead=lambda: dead.append(True)) as (base, app):
        yield Served(base, app, served.model_dir, served.reference)
    client.stop()
    assert not dead and not client.running


async def _stream(client: httpx.AsyncClient, body: dict) -> dict[int, list]:
    """Stream a completion: {choice index: [text chunks, finish_reason]}."""
    choices: dict[int, list] = {}
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                return choices
            if line.startswith("data: "):
                for c in json.loads(line[6:])["choices"]:
                    entry = choices.setdefault(c["index"], [[], None])
                    entry[0].append(c["text"])
                    entry[1] = c["finish_reason"] or entry[1]
    raise AssertionError("no [DONE]")


async def _many(base_url: str, bodies: list[dict]) -> list:
    limits = httpx.Limits(max_connections=len(bodies) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=180) as client:
        return await asyncio.gather(*[_stream(client, b) for b in bodies])


def test_concurrent_streams_equal_offline(core_served, served):
    """200 greedy streams at once (some n=2, some with a stop string) give LLM.generate's text."""
    base = {"model": MODEL, "max_tokens": LOAD_MAX_TOKENS, "temperature": 0}
    bodies = [{**base, "prompt": LOAD_PROMPTS[i % len(LOAD_PROMPTS)],
               **({"n": 2} if i % 10 == 1 else {})} for i in range(NUM_STREAMS)]
    start = time.perf_counter()
    results = asyncio.run(_many(core_served.base_url, bodies))
    elapsed = time.perf_counter() - start
    for body, choices in zip(bodies, results):
        assert sorted(choices) == list(range(body.get("n", 1)))
        for text, finish in choices.values():
            assert "".join(text) == core_served.reference[body["prompt"]] and finish
    # Stop strings (checked in the core): as the in-process server, which the engine detokenizes.
    prompt = next(p for p in LOAD_PROMPTS if len(core_served.reference[p]) > 4)
    stop = core_served.reference[prompt][2:4]
    stopped = {**base, "prompt": prompt, "stop": [stop]}
    want = served.post("/v1/completions", json=stopped).json()["choices"][0]
    got = core_served.post("/v1/completions", json=stopped).json()["choices"][0]
    assert (got["text"], got["finish_reason"]) == (want["text"], want["finish_reason"])
    streamed = asyncio.run(_many(core_served.base_url, [stopped]))[0][0]
    assert ("".join(streamed[0]), streamed[1]) == (want["text"], want["finish_reason"])
    assert core_served.wait_idle() == {"num_requests_running": 0.0,
                                       "num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}
    counts = {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
              for line in core_served.get("/metrics").text.splitlines()
              if line.startswith("vllm:") and "_count{" in line}
    for phase in ("queue", "prefill", "decode"):  # every request observed once per phase
        assert counts[f"vllm:request_{phase}_time_seconds_count"] >= NUM_STREAMS, counts
    print(f"{NUM_STREAMS} streams through the engine core process in {elapsed:.1f}s")


def test_logprobs_echo_and_failures_as_in_process(core_served, served):
    """Logprobs (sampled and echoed prompt) equal the in-process server's; a step that raises
    (fault injection in the core) fails only its request, 500 internal_error without internal
    text, and a stream that hangs up midway is aborted: no pages stay used."""
    body = {"model": MODEL, "prompt": LOAD_PROMPTS[3], "max_tokens": 5, "temperature": 0,
            "logprobs": 2, "echo": True}
    want = served.post("/v1/completions", json=body).json()["choices"]
    got = core_served.post("/v1/completions", json=body).json()["choices"]
    assert got == want
    poisoned = core_served.post("/v1/completions", json={**body, "prompt": "POISON x"})
    assert poisoned.status_code == 500, poisoned.text
    error = poisoned.json()["error"]
    assert error["code"] == "internal_error" and "njected" not in error["message"]
    assert core_served.post("/v1/completions", json=body).json()["choices"] == want

    async def quit_midway():
        async with httpx.AsyncClient(base_url=core_served.base_url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": "hi", "max_tokens": 100, "ignore_eos": True,
                    "stream": True}) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        return

    asyncio.run(quit_midway())
    assert core_served.wait_idle() == {"num_requests_running": 0.0,
                                       "num_requests_waiting": 0.0, "kv_cache_usage_perc": 0.0}


def test_slow_reader_gets_coalesced_chunks(core_served):
    """A reader that takes 0.4 s per chunk: the tokens made meanwhile arrive in one chunk (fewer
    chunks than tokens), and the text is still the offline one."""
    from jaxserve.server.protocol import CompletionRequest

    serving = core_served.app.serving
    prompt = LOAD_PROMPTS[1]

    async def main():
        body = CompletionRequest(model=MODEL, prompt=prompt, max_tokens=LOAD_MAX_TOKENS,
                                 temperature=0, stream=True)
        gen = await serving.start_completion(body)
        texts = []
        async for event in serving.completion_events(gen):
            data = event[6:].strip()
            if data != b"[DONE]":
                texts.append(json.loads(data)["choices"][0]["text"])
            await asyncio.sleep(0.4)
        return texts, gen

    texts, gen = asyncio.run(main())
    num_tokens = len(gen.finished[gen.stream.request_ids[0]].outputs[0].token_ids)
    assert "".join(texts) == core_served.reference[prompt]
    assert len(texts) < num_tokens, (texts, num_tokens)
    print(f"slow reader: {num_tokens} tokens in {len(texts)} chunks")


def test_full_waiting_queue_answers_503(core_served):
    """Waiting bound 4 under 48 long requests at once: some are refused with 503 + Retry-After
    (code overloaded), every admitted one completes, nothing leaks."""
    serving = core_served.app.serving
    config = dataclasses.replace(serving.config, max_waiting_requests=4)
    body = {"model": MODEL, "prompt": LOAD_PROMPTS[2], "max_tokens": 60, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(base_url=core_served.base_url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*[client.post("/v1/completions", json=body)
                                          for _ in range(48)])

    with override(serving, config=config):
        responses = asyncio.run(main())
    refused = [r for r in responses if r.status_code == 503]
    done = [r for r in responses if r.status_code == 200]
    assert refused and done and len(refused) + len(done) == 48
    for r in refused:
        assert r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded"
    assert all(r.json()["usage"]["completion_tokens"] == 60 for r in done)
    assert core_served.wait_idle()["kv_cache_usage_perc"] == 0
    print(f"waiting bound 4: {len(done)} served, {len(refused)} refused")


def _read_stream(base: str, started: threading.Event, results: list) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 120, "n": 2, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as resp:
        lines = []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                started.set()
    results.append(lines)


def test_killed_core_fails_open_streams_and_the_server_exits(tiny_model_dir):
    proc, base = start_cli(tiny_model_dir)
    try:
        results: list = []
        events = [threading.Event() for _ in range(4)]
        threads = [threading.Thread(target=_read_stream, args=(base, ev, results))
                   for ev in events]
        for t in threads:
            t.start()
        for ev in events:
            assert ev.wait(60)
        pids = core_pids(proc.pid)
        assert pids, "no engine core process"
        os.kill(pids[0], signal.SIGKILL)
        for t in threads:
            t.join(30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert code == EXIT_ENGINE_DEAD, output[-3000:]
    assert len(results) == 4
    for lines in results:  # every open stream: an error event, then [DONE]
        assert lines[-1] == "[DONE]"
        assert json.loads(lines[-2])["error"]["code"] == "engine_dead"
    assert "engine core process exited" in output


def test_stream_coalesces_news_of_a_slow_reader():
    """RequestStream keeps each request's latest output only: three pushes before the reader
    resumes give one output; an error pushed after news ends the iteration after it."""

    def out(num_tokens: int, finished: bool = False) -> RequestOutput:
        c = CompletionOutput(index=0, text="x" * num_tokens, token_ids=[1] * num_tokens,
                             finish_reason="length" if finished else None)
        return RequestOutput(request_id="a", prompt=None, prompt_token_ids=[1], outputs=[c],
                             finished=finished)

    async def main():
        stream = RequestStream(asyncio.get_running_loop(), ["a"])
        for n in (1, 2, 3):
            stream.push("a", out(n))
        seen = []
        async for item in stream:
            seen.append(len(item.outputs[0].token_ids))
            if len(seen) == 1:
                stream.push("a", out(4))
                stream.push("a", out(5, finished=True))
        return seen

    assert asyncio.run(main()) == [3, 5]

    async def failing():
        stream = RequestStream(asyncio.get_running_loop(), ["a"])
        stream.push("a", out(2))
        stream.fail(RuntimeError("gone"))
        seen = []
        with pytest.raises(RuntimeError):
            async for item in stream:
                seen.append(len(item.outputs[0].token_ids))
        return seen

    assert asyncio.run(failing()) == [2]


def test_core_sends_without_waiting_for_the_reader():
    """The step loop hands messages to a sender thread: three ~1 MB step messages (far beyond a
    pipe's buffer) queue at once while nobody reads; then they arrive whole and in order."""
    from multiprocessing import Pipe

    from jaxserve.engine_core import EngineCore

    reader, writer = Pipe(duplex=False)
    core = EngineCore(engine=None, commands=None, outputs=writer)
    big = [f"{i:08d}" * 100 for i in range(1000)]  # distinct strings: pickle cannot share them
    sender = threading.Thread(target=lambda: [core.send(("step", big, [], i)) for i in range(3)])
    sender.start()
    sender.join(timeout=2.0)
    assert not sender.is_alive(), "send() blocked on the pipe"
    assert [reader.recv()[3] for _ in range(3)] == [0, 1, 2]
    core.flush(timeout=5.0)
    assert not core._sender.is_alive()  # noqa: SLF001
