"""Soak test (not in CI): mixed valid, invalid and disconnecting clients against a `jaxserve serve`
process for N minutes, sampling its RSS, open fds, threads and KV usage (/metrics) every minute.

    .venv/bin/python scripts/soak.py --minutes 30 --out soak.json              # starts a CPU server
    .venv/bin/python scripts/soak.py --minutes 30 --url http://127.0.0.1:8000 --pid PID  # attach

Writes the samples (and request counts by outcome) as JSON and prints them as a table. A healthy
server shows flat RSS, fds and threads after the first minutes and KV usage back near 0.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx

VALID = [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 16}),
    ("/v1/completions", {"prompt": ["Once upon a time", "def add(a, b):"], "max_tokens": 8,
                         "n": 2, "temperature": 0.8, "seed": 1}),
    ("/v1/completions", {"prompt": "Count: 1, 2, 3,", "max_tokens": 24, "stream": True,
                         "logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hi."}],
                              "max_tokens": 16}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "List three colors."}],
                              "max_tokens": 24, "stream": True, "top_p": 0.9}),
]
INVALID = [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    ("/v1/completions", {"prompt": [10**23]}),
    ("/v1/completions", {"prompt": "x", "top_k": 2**31, "max_tokens": 2}),
    ("/v1/completions", {"prompt": "\ud800"}),
    ("/v1/chat/completions", {"messages": "nope"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "chat_template": "{% for i in range(9) %}{% endfor %}"}),
    ("/v1/nope", {}),
]


def _server(args) -> tuple[subprocess.Popen | None, str, int]:
    if args.url:
        return None, args.url, args.pid
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", *args.model, "--port", str(port),
           "--disable-uvicorn-access-log", "--max-model-len", "512", *args.serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1800):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base, proc.pid
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        time.sleep(0.5)
    raise SystemExit("the server did not come up")


def _client(base: str, stop: threading.Event, counts: Counter, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=120) as http:
        while not stop.is_set():
            kind = rng.choices(["valid", "invalid", "quit"], [6, 3, 2])[0]
            path, body = rng.choice(INVALID if kind == "invalid" else VALID)
            try:
                if kind == "quit":  # send, read a little (or nothing), hang up
                    with http.stream("POST", path, json={**body, "max_tokens": 64}) as resp:
                        for _ in zip(range(rng.randint(0, 3)), resp.iter_lines()):
                            pass
                    counts["quit"] += 1
                    continue
                content = json.dumps(body).encode("utf-8", "surrogatepass")
                resp = http.post(path, content=content,
                                 headers={"content-type": "application/json"})
                counts[f"{kind} {resp.status_code}"] += 1
            except httpx.HTTPError as e:
                counts[f"{kind} {type(e).__name__}"] += 1


def _proc_stats(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "threads": int(status["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _kv(base: str) -> dict:
    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        for name, key in (("vllm:kv_cache_usage_perc", "kv_usage"),
                          ("vllm:num_requests_running", "running"),
                          ("vllm:num_requests_waiting", "waiting")):
            if line.startswith(name + "{"):
                out[key] = round(float(line.rsplit(" ", 1)[1]), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--out", default="soak.json")
    p.add_argument("--url", default=None, help="attach to a running server (needs --pid)")
    p.add_argument("--pid", type=int, default=None)
    p.add_argument("--model", nargs="*", default=[], help="MODEL for the started server")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args()
    proc, base, pid = _server(args)
    stop, counts = threading.Event(), Counter()
    threads = [threading.Thread(target=_client, args=(base, stop, counts, i), daemon=True)
               for i in range(args.clients)]
    start = time.monotonic()
    samples = [{"minute": 0.0, **_proc_stats(pid), **_kv(base)}]
    for t in threads:
        t.start()
    try:
        while time.monotonic() - start < args.minutes * 60:
            time.sleep(min(args.interval, args.minutes * 60 - (time.monotonic() - start)))
            samples.append({"minute": round((time.monotonic() - start) / 60, 2),
                            **_proc_stats(pid), **_kv(base), "requests": sum(counts.values())})
            print(samples[-1], flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(150)
        time.sleep(2)
        samples.append({"minute": "idle", **_proc_stats(pid), **_kv(base)})
        healthy = httpx.get(base + "/health", timeout=10).status_code
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    report = {"minutes": args.minutes, "clients": args.clients, "health_at_end": healthy,
              "outcomes": dict(sorted(counts.items())), "samples": samples}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    cols = ["minute", "rss_mib", "fds", "threads", "kv_usage", "running", "waiting", "requests"]
    print(" ".join(f"{c:>9}" for c in cols))
    for s in samples:
        print(" ".join(f"{str(s.get(c, '')):>9}" for c in cols))
    print("outcomes:", report["outcomes"], "health at end:", healthy)


if __name__ == "__main__":
    main()
