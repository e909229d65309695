"""Load: 200 concurrent greedy streams over loopback all equal LLM.generate's text, while clients
that hang up midway are aborted and leave no KV pages behind."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx

from tests.server.conftest import LOAD_MAX_TOKENS, LOAD_PROMPTS, MODEL

NUM_STREAMS = 200
NUM_QUITTERS = 20


async def _stream(client: httpx.AsyncClient, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": LOAD_MAX_TOKENS, "temperature": 0,
            "stream": True}
    text, done = [], False
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            text.append(json.loads(line[6:])["choices"][0]["text"])
    assert done
    return "".join(text)


async def _quit_midway(client: httpx.AsyncClient, prompt: str) -> int:
    """Stream a long request, hang up after two chunks; returns the chunks seen."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 100, "temperature": 0,
            "stream": True, "ignore_eos": True}
    seen = 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == 2:
                    break  # leaving the block closes the connection mid-stream
    return seen


async def _run(base_url: str) -> tuple[list[str], list[int]]:
    limits = httpx.Limits(max_connections=NUM_STREAMS + NUM_QUITTERS + 10,
                          max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=180) as client:
        prompts = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(NUM_STREAMS)]
        streams = [_stream(client, p) for p in prompts]
        quitters = [_quit_midway(client, LOAD_PROMPTS[i]) for i in range(NUM_QUITTERS)]
        results = await asyncio.gather(*streams, *quitters)
    return results[:NUM_STREAMS], results[NUM_STREAMS:]


def _aborted(metrics_text: str) -> int:
    found = re.search(r'vllm:request_success_total\{[^}]*finished_reason="abort"\} (\d+)',
                      metrics_text)
    return int(found.group(1)) if found else 0


def test_200_concurrent_streams_match_offline_and_quitters_free_pages(served):
    aborted_before = _aborted(served.get("/metrics").text)
    start = time.perf_counter()
    texts, seen = asyncio.run(_run(served.base_url))
    elapsed = time.perf_counter() - start
    prompts = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(NUM_STREAMS)]
    mismatches = [(p, t) for p, t in zip(prompts, texts) if t != served.reference[p]]
    assert not mismatches, mismatches[:3]
    assert seen == [2] * NUM_QUITTERS
    gauges = served.wait_idle()
    assert gauges == {"num_requests_running": 0.0, "num_requests_waiting": 0.0,
                      "kv_cache_usage_perc": 0.0}
    assert _aborted(served.get("/metrics").text) - aborted_before == NUM_QUITTERS
    print(f"{NUM_STREAMS} streams + {NUM_QUITTERS} hang-ups in {elapsed:.1f}s")
