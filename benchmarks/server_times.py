"""Where a served request's time goes, from the server's own /metrics: the mean of each of vLLM's
request-time histograms over one benchmark run (the difference of `_sum` / `_count` between a
scrape before and one after). Next to the client's TTFT, it splits queueing in the engine core,
prefill, and what the API process and the transport add."""
from __future__ import annotations

import contextlib

import httpx

HISTOGRAMS = {  # printed name -> vLLM metric
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "ttft": "vllm:time_to_first_token_seconds",
    "decode": "vllm:request_decode_time_seconds",
}


def parse_sums(text: str) -> dict[str, float]:
    """{"<metric>_sum" | "<metric>_count": value} summed over label sets (DP replicas add up)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        if name.endswith(("_sum", "_count")):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def mean_times_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms of each histogram over the requests that finished between the two scrapes."""
    means = {}
    for label, metric in HISTOGRAMS.items():
        count = after.get(metric + "_count", 0.0) - before.get(metric + "_count", 0.0)
        if count > 0:
            total = after.get(metric + "_sum", 0.0) - before.get(metric + "_sum", 0.0)
            means[label] = 1e3 * total / count
    return means


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's histogram sums now ({} if it has no /metrics)."""
    with contextlib.suppress(httpx.HTTPError):
        resp = await client.get("/metrics")
        if resp.status_code == 200:
            return parse_sums(resp.text)
    return {}
