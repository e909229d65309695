"""`jaxserve serve` as a real subprocess: its flags (--api-key, --served-model-name, inline
--chat-template) and the SIGTERM drain (503 for new requests, in-flight streams finish, exit 0)."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import start_cli

KEY = "test-key"
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}A:"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cli_server(tiny_model_dir):
    proc, base = start_cli(tiny_model_dir, "--api-key", KEY, "--served-model-name", "alpha",
                           "beta", "--chat-template", TEMPLATE, "--drain-timeout", "60",
                           "--disable-uvicorn-access-log")
    yield proc, base
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _long_stream(base: str, results: list, started: threading.Event) -> None:
    body = {"model": "beta", "prompt": "Once upon a time", "max_tokens": 100, "n": 2,
            "temperature": 0, "stream": True, "ignore_eos": True}
    tokens, finishes, done = 0, [], False
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH,
                      timeout=120) as resp:
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                started.set()
                choice = json.loads(line[6:])["choices"][0]
                tokens += 1
                if choice["finish_reason"]:
                    finishes.append(choice["finish_reason"])
    results.append((resp.status_code, finishes, done))


def _run_streams(base: str, num: int) -> tuple[list, list[threading.Thread]]:
    results: list = []
    events = [threading.Event() for _ in range(num)]
    threads = [threading.Thread(target=_long_stream, args=(base, results, ev)) for ev in events]
    for t in threads:
        t.start()
    for ev in events:
        assert ev.wait(120)
    return results, threads


def test_flags(cli_server):
    _, base = cli_server
    assert httpx.get(base + "/v1/models").status_code == 401
    wrong = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    models = httpx.get(base + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["alpha", "beta"]
    ids = httpx.post(base + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    text = httpx.post(base + "/detokenize", json={"tokens": ids.json()["tokens"]})
    assert text.json()["prompt"] == "[user] hi\nA:"
    chat = httpx.post(base + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["model"] == "alpha"
    results, threads = _run_streams(base, 16)  # compiles the batch buckets the drain test uses
    for t in threads:
        t.join(120)
    assert all(r == (200, ["length", "length"], True) for r in results)


def test_sigterm_drains_then_exits(cli_server):
    proc, base = cli_server
    # 32 streams of n=2 (64 sequences, twice max_num_seqs): the drain outlasts the check below
    # (16 drained in under 0.2 s once the engine ran in its own process).
    results, threads = _run_streams(base, 32)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.1)
    refused = httpx.post(base + "/v1/completions", headers=AUTH, json={"prompt": "x"})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "shutting_down"
    for t in threads:
        t.join(120)
    assert len(results) == 32
    assert all(r == (200, ["length", "length"], True) for r in results), results
    assert proc.wait(30) == 0
    print(f"drained 32 streams and exited {time.monotonic() - signalled:.2f}s after SIGTERM")
