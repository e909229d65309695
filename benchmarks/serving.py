"""Online serving benchmark, like `vllm bench serve`: streaming OpenAI requests at Poisson arrivals
against a running server (or one started with --launch "SERVE ARGS"); vLLM's throughput and TTFT/
TPOT/ITL/E2EL table, JSON and a throughput-latency PNG. No JAX here: on a GPU machine a JAX client
would grab the device memory the server it launched needs. The streams go out over raw HTTP/1.1
from --num-clients processes (benchmarks/serving_client.py), so the client is not what it measures.
python -m benchmarks.serving --num-prompts 200 --random-input-len 512 --random-output-len 256 \
    --ignore-eos --sweep-rates 1,4,16,inf [--launch "--model llama-3-8b --load-format dummy ..."]
Issue 20's 1,000 users (Qwen2-7B, 100 in / 200 out, T 0.7 top_p 0.9, 100..1,000 users):
python -m benchmarks.serving --preset enterprise --vocab-size 151936 --launch "qwen2-7b \
    --load-format dummy --max-model-len 1024 --max-num-seqs 1024 --max-num-batched-tokens 8192"
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import orjson

from benchmarks import server_times
from benchmarks.serving_client import (RequestRecord, Target, default_num_clients, loop_factory,
                                       split)
from benchmarks.serving_client import run_load as run_shares
from benchmarks.serve_process import launched_server, reset_prefix_cache

METRICS = ("ttft", "tpot", "itl", "e2el")  # each reported as mean/median/std/p99, in ms
# Named scenarios: defaults a flag given on the command line still overrides.
PRESETS = {
    # issue 20 (the seed lesson's customer-service case): 2,000 requests of 100 tokens in / 200
    # out, the seed's sampling, at 100 / 250 / 500 / 1,000 concurrent users; 1,000 warm-up
    # requests at once compile the batch shapes of 1,000 sequences before anything is timed.
    "enterprise": dict(num_prompts=2000, random_input_len=100, random_output_len=200,
                       ignore_eos=True, temperature=0.7, extra_body={"top_p": 0.9},
                       sweep_concurrency="100,250,500,1000", num_warmups=1000),
}


@dataclass
class RequestInput:
    prompt: list[int] | str  # token ids (random) or text (ShareGPT)
    prompt_len: int  # tokens, as the client knows it; the server's usage count replaces it
    output_len: int  # max_tokens sent


def random_requests(args, vocab_size: int) -> list[RequestInput]:
    """Seeded token-id prompts in [0, vocab_size); lengths uniform in base*(1 -+ range_ratio)."""
    rng, ratio = np.random.default_rng(args.seed), args.random_range_ratio

    def lengths(base: int) -> list[int]:
        lo, hi = max(1, int(base * (1 - ratio))), int(base * (1 + ratio))
        return rng.integers(lo, hi + 1, size=args.num_prompts).tolist()

    return [RequestInput(rng.integers(0, vocab_size, size=n).tolist(), n, o)
            for n, o in zip(lengths(args.random_input_len), lengths(args.random_output_len))]


async def sharegpt_requests(args, client: httpx.AsyncClient) -> list[RequestInput]:
    """First turn as the prompt, the reply's length (or --sharegpt-output-len) as max_tokens;
    pairs with 4..1024 tokens on both sides, in an order shuffled by --seed."""
    async def count_tokens(text: str) -> int:  # the server's /tokenize; else ~4 chars a token
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            return int((await client.post("/tokenize", json={"prompt": text})).json()["count"])
        return max(1, len(text) // 4)

    rows = json.loads(Path(args.dataset_path).read_text())
    np.random.default_rng(args.seed).shuffle(rows)
    out = []
    for row in rows:
        turns = row.get("conversations", [])
        if len(turns) < 2:
            continue
        prompt_len, reply_len = [await count_tokens(t["value"]) for t in turns[:2]]
        if 4 <= prompt_len <= 1024 and 4 <= reply_len <= 1024:
            out.append(RequestInput(turns[0]["value"], prompt_len,
                                    args.sharegpt_output_len or reply_len))
        if len(out) == args.num_prompts:
            break
    return out


def arrival_gaps(num: int, rate: float, seed: int) -> np.ndarray:
    """Seconds to wait before each request: exponential gaps (Poisson arrivals); 0 for rate inf."""
    gaps = np.zeros(num) if math.isinf(rate) else \
        np.random.default_rng(seed).exponential(1.0 / rate, size=num)
    gaps[:1] = 0.0  # the first request goes at once, as in vLLM
    return gaps


def request_body(args, model: str, req: RequestInput) -> dict:
    body = {"model": model, "max_tokens": req.output_len, "stream": True,
            "stream_options": {"include_usage": True}}
    chat = args.endpoint.endswith("/chat/completions")
    if chat and not isinstance(req.prompt, str):
        raise ValueError(f"{args.endpoint=} needs text prompts: pass --dataset-path")
    body.update({"messages": [{"role": "user", "content": req.prompt}]} if chat
                else {"prompt": req.prompt})
    if args.logprobs is not None:
        body.update({"logprobs": True, "top_logprobs": args.logprobs} if chat
                    else {"logprobs": args.logprobs})
    body.update({"ignore_eos": True} if args.ignore_eos else {})
    body.update({"temperature": args.temperature} if args.temperature is not None else {})
    return body | args.extra_body


async def run_load(args, model: str, requests: list[RequestInput], rate: float
                   ) -> tuple[list[RequestRecord], float, list[float]]:
    """Send `requests` at `rate` (req/s, Poisson), at most --max-concurrency in flight, from
    --num-clients processes (default: one per 250 streams); records, duration and each client
    process's CPU seconds."""
    bodies = [orjson.dumps(request_body(args, model, r)) for r in requests]
    offsets = np.cumsum(arrival_gaps(len(requests), rate, args.seed)).tolist()
    num_clients = args.num_clients or default_num_clients(args.max_concurrency, len(requests))
    shares = split(bodies, [r.prompt_len for r in requests], offsets, args.max_concurrency,
                   num_clients)
    return await run_shares(Target.of(args.base_url, args.endpoint), shares)


def _stats(prefix: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict:
    v = np.asarray(values_s, dtype=np.float64) * 1000.0 if values_s else np.zeros(1)
    out = {f"mean_{prefix}_ms": float(v.mean()), f"median_{prefix}_ms": float(np.median(v)),
           f"std_{prefix}_ms": float(v.std())}
    for p in percentiles:
        out[f"p{p:g}_{prefix}_ms"] = float(np.percentile(v, p))
    return out


def summarize(records: list[RequestRecord], duration: float,
              percentiles: tuple[float, ...] = (99,)) -> dict:
    """vLLM's serving metrics over the successful requests; TPOT = (e2el-ttft)/(tokens-1)."""
    ok = [r for r in records if r.success]
    num_in = sum(r.prompt_len for r in ok)
    num_out = sum(r.output_tokens for r in ok)
    values = {"ttft": [r.ttft for r in ok], "e2el": [r.e2el for r in ok],
              "itl": [gap for r in ok for gap in r.itl],
              "tpot": [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok
                       if r.output_tokens > 1]}
    out = {"completed": len(ok), "failed": len(records) - len(ok), "duration": duration,
           "total_input_tokens": num_in, "total_output_tokens": num_out,
           "request_throughput": len(ok) / duration, "output_throughput": num_out / duration,
           "total_token_throughput": (num_in + num_out) / duration,
           # > 1 when chunks carry several tokens (text held back mid-character): ITL then
           # measures chunk gaps, not token gaps; send logprobs for one chunk per token
           "tokens_per_chunk": num_out / max(1, sum(len(r.itl) + 1 for r in ok)),
           "errors": sorted({r.error for r in records if not r.success})[:5]}
    for name in METRICS:
        out.update(_stats(name, values[name], percentiles))
    return out


TABLE = [("Request rate (req/s)", "request_rate"), ("Successful requests", "completed"),
         ("Failed requests", "failed"), ("Benchmark duration (s)", "duration"),
         ("Total input tokens", "total_input_tokens"), ("Total generated tokens",
         "total_output_tokens"), ("Request throughput (req/s)", "request_throughput"),
         ("Output token throughput (tok/s)", "output_throughput"), ("Total token throughput "
         "(tok/s)", "total_token_throughput"), ("Tokens per chunk", "tokens_per_chunk")]


def print_table(s: dict) -> None:
    print(f"{' Serving Benchmark Result ':=^56}")
    for label, key in TABLE:
        value = s[key]
        print(f"{label + ':':<42}{value:>14.2f}" if isinstance(value, float)
              else f"{label + ':':<42}{value:>14}")
    for name, title in zip(METRICS, ("Time to First Token", "Time per Output Token (excl. 1st)",
                                     "Inter-token Latency", "End-to-end Latency")):
        print(f"{' ' + title + ' ':-^56}")
        for stat in ("mean", "median", "p99"):
            print(f"{f'{stat.capitalize()} {name.upper()} (ms):':<42}"
                  f"{s[f'{stat}_{name}_ms']:>14.2f}")
    for err in s["errors"]:
        print(f"error: {err}")
    print("=" * 56)


def _output_of(*cmd: str) -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.check_output(cmd, text=True, stderr=subprocess.DEVNULL).strip()
    return "unknown"


def client_environment() -> dict:
    """common.environment() without JAX (see the module docstring): git, host, GPU names."""
    # JAXSERVE_COMMIT wins, as in common.environment(): a GPU copy's .git can be stale.
    commit = os.environ.get("JAXSERVE_COMMIT") or _output_of("git", "rev-parse", "--short", "HEAD")
    return {"commit": commit,
            "gpus": _output_of("nvidia-smi", "--query-gpu=name", "--format=csv,noheader"),
            "host": platform.node(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def plot_curve(path: Path, title: str, runs: list[dict]) -> None:
    """Output tok/s against median TPOT and median TTFT, one labelled point per request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_users = len({r["max_concurrency"] for r in runs}) > 1  # a concurrency sweep
    x = [r["max_concurrency"] if by_users else r["output_throughput"] for r in runs]
    for ax, key, label in zip(axes, ("median_tpot_ms", "median_ttft_ms"),
                              ("median TPOT (ms)", "median TTFT (ms)")):
        y = [r[key] for r in runs]
        ax.plot(x, y, marker="o")
        for r, xi, yi in zip(runs, x, y):
            note = (f"{r['output_throughput']:.0f} tok/s" if by_users
                    else f"{r['request_rate']:g} req/s")
            ax.annotate(note, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel="concurrent users" if by_users else "output tokens/s", ylabel=label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


async def amain(args) -> dict:
    """Warm up, run every rate of the sweep against args.base_url, write JSON + PNG."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, http1=True, limits=limits,
                                 timeout=httpx.Timeout(None)) as client:
        info = (await client.get("/v1/models")).raise_for_status().json()["data"][0]
        model = args.model or info["id"]
        requests = (await sharegpt_requests(args, client) if args.dataset_path
                    else random_requests(args, args.vocab_size))
        if not requests:
            raise ValueError(f"no requests: {args.num_prompts=}, {args.dataset_path=}")
        if args.num_warmups:
            warm = [requests[i % len(requests)] for i in range(args.num_warmups)]
            records, _, cpus = await run_load(args, model, warm, math.inf)
            print(f"warm-up: {sum(r.success for r in records)}/{len(records)} requests ok "
                  f"({len(cpus)} client processes)")
        runs = []
        for rate, args.max_concurrency in args.points:
            print(f"rate {rate:g} req/s, max concurrency {args.max_concurrency or 'none'}: "
                  f"{len(requests)} requests")
            reset = await reset_prefix_cache(client)
            before = await server_times.scrape(client)
            records, duration, cpus = await run_load(args, model, requests, rate)
            server = server_times.mean_times_ms(before, await server_times.scrape(client))
            summary = {"request_rate": rate, "max_concurrency": args.max_concurrency,
                       "prefix_cache_reset": reset, "num_clients": len(cpus),
                       # CPU seconds per client process; near `duration`: the client is the limit
                       "client_cpu_s": cpus,
                       **summarize(records, duration),
                       "server_mean_ms": server}
            if args.save_detailed:
                summary["requests"] = [vars(r) for r in records]
            print_table(summary)
            if server:
                print("server means (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in server.items()))
            print(f"client: {len(cpus)} processes, the busiest at "
                  f"{100 * max(cpus) / duration:.0f}% of a core")
            runs.append(summary)
    tag = model.rstrip("/").split("/")[-1]
    name = args.name or f"serving_{tag}_{args.random_input_len}_{args.random_output_len}"
    path = Path(args.out) / f"{name}.json"  # as benchmarks.common.write_results writes it
    result = {"args": {k: v for k, v in vars(args).items() if k != "points"},
              "env": client_environment(), "model": model, "server_model": info, "runs": runs,
              "json_path": str(path), "png_path": str(path.with_suffix(".png"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {path}")
    plot_curve(path.with_suffix(".png"), name, runs)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="served name (default: first of /v1/models)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=32000, help="random ids are < this")
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON (text prompts)")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="default: the reply's")
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s; inf: all at once")
    p.add_argument("--sweep-rates", default=None, help="comma list, e.g. 1,2,4,8,16,inf")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--sweep-concurrency", default=None,
                   help="comma list of max concurrencies, one run each (plot: TTFT/TPOT per users)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named scenario's defaults (enterprise: issue 20's 1,000 users)")
    p.add_argument("--num-clients", type=int, default=None,
                   help="client processes sharing the streams (default: one per 250)")
    p.add_argument("--num-warmups", type=int, default=1, help="untimed requests, all at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=None, help="default: the server's")
    p.add_argument("--logprobs", type=int, default=None,
                   help="top logprobs per token; any value makes every token its own chunk")
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into bodies")
    p.add_argument("--save-detailed", action="store_true", help="per-request records in the JSON")
    p.add_argument("--launch", default=None, help='"ARGS" for `python -m jaxserve.cli serve`')
    p.add_argument("--launch-timeout", type=float, default=1800.0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None)
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    rates = [float(r) for r in (args.sweep_rates.split(",") if args.sweep_rates
                                else [args.request_rate])]
    users = ([int(c) for c in args.sweep_concurrency.split(",")] if args.sweep_concurrency
             else [args.max_concurrency])
    if len(rates) > 1 and len(users) > 1:
        raise ValueError("sweep request rates or concurrencies, not both")
    args.points = [(rate, c) for rate in rates for c in users]  # (request rate, max concurrency)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    log = Path(args.out) / f"{args.name or 'serving'}_server.log"
    with (launched_server(args.launch, log, args.launch_timeout) if args.launch
          else contextlib.nullcontext(args.base_url)) as args.base_url:
        return asyncio.run(amain(args), loop_factory=loop_factory())


if __name__ == "__main__":
    main()
