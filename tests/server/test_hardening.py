"""Issue 12 on the shared in-process server: errors in OpenAI's shape everywhere, API-key details,
a quitting non-streaming client, and an engine step that raises (fault injection) failing only
the requests it ran while everyone else finishes with the offline outputs."""
from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from jaxserve.server import faults, gate
from tests.server.conftest import LOAD_MAX_TOKENS, LOAD_PROMPTS, MODEL, override

PROMPT = LOAD_PROMPTS[0]


def _assert_shape(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_fastapi_errors_in_openai_shape(served):
    _assert_shape(served.get("/v1/nope"), 404, "not_found")
    _assert_shape(served.get("/v1/completions"), 405, "method_not_allowed")
    bad_utf8 = served.post("/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                           headers={"content-type": "application/json"})
    _assert_shape(bad_utf8, 400)
    deep = b"[" * 100_000 + b"]" * 100_000
    _assert_shape(served.post("/v1/chat/completions", content=deep,
                              headers={"content-type": "application/json"}), 400)
    assert served.get("/health").status_code == 200


def test_api_key_guards_operator_routes_and_refuses_two_headers(served):
    key = "s3cret"
    with override(served.app, api_key=key.encode()):
        _assert_shape(served.post("/reset_prefix_cache"), 401, "invalid_api_key")
        ok = served.post("/reset_prefix_cache", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code in (200, 409)
        two = [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {key}")]
        _assert_shape(httpx.get(served.base_url + "/v1/models", headers=two), 401)
        assert served.get("/health").status_code == 200
        assert served.post("/tokenize", json={"prompt": "hi"}).status_code == 200  # as vLLM


def test_api_key_compare_is_on_digests(served, monkeypatch):
    """The compare sees two sha256 digests, so its time says nothing about the key's length."""
    seen = []
    real = gate.hmac.compare_digest
    monkeypatch.setattr(gate.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    with override(served.app, api_key=b"a-much-longer-key-than-the-guess"):
        assert httpx.get(served.base_url + "/v1/models",
                         headers={"Authorization": "Bearer short"}).status_code == 401
    assert seen and all(len(a) == len(b) == 32 for a, b in seen)
    assert seen[0][1] == hashlib.sha256(b"a-much-longer-key-than-the-guess").digest()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_non_streaming_client_that_quits_is_aborted_quietly(served):
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn", "jaxserve", "asyncio")]
    for lg in loggers:
        lg.addHandler(handler)
    before = _aborted(served)
    try:
        body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 100,
                           "ignore_eos": True}).encode()
        port = int(served.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 30
            while served.gauges()["num_requests_running"] == 0:  # it is generating now
                assert time.monotonic() < deadline
                time.sleep(0.02)
        gauges = served.wait_idle()
        assert gauges["kv_cache_usage_perc"] == 0 and gauges["num_requests_running"] == 0
        time.sleep(0.3)  # let the handler finish unwinding
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert _aborted(served) == before + 1  # the engine side was aborted
    errors = [r for r in handler.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not any("InvalidStateError" in (r.exc_text or "") + r.getMessage()
                   for r in handler.records)


def _aborted(served) -> float:
    for line in served.get("/metrics").text.splitlines():
        if line.startswith("vllm:request_success_total") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def poisoned(served):
    """The shared engine with `raise:POISON` fault injection (removed afterwards)."""
    engine = served.app.serving.async_engine.engine
    uninstall = faults.install(engine, "raise:POISON")
    yield engine
    uninstall()


def _complete(served, prompt: str, out: dict) -> None:
    resp = served.post("/v1/completions", json={"model": MODEL, "prompt": prompt,
                                                "max_tokens": LOAD_MAX_TOKENS, "temperature": 0})
    out[prompt] = resp


def _concurrently(served, prompts: list[str]) -> dict[str, httpx.Response]:
    out: dict[str, httpx.Response] = {}
    threads = [threading.Thread(target=_complete, args=(served, p, out)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out) == len(prompts), "a request never got an answer"
    return out


def _check_failed(resp: httpx.Response) -> None:
    err = _assert_shape(resp, 500, "internal_error")
    assert "Injected" not in err["message"] and "injected" not in err["message"]


def test_failing_step_spares_everyone_not_in_it(served, poisoned):
    """One sequence per step: the poisoned request fails alone, the queued ones all finish with
    the offline greedy text, nothing leaks, and the server keeps serving."""
    good = LOAD_PROMPTS[:6]
    with override(poisoned.scheduler, max_num_seqs=1):
        out = _concurrently(served, [good[0], "POISON " + PROMPT, *good[1:]])
    _check_failed(out["POISON " + PROMPT])
    for p in good:
        assert out[p].status_code == 200, out[p].text
        assert out[p].json()["choices"][0]["text"] == served.reference[p]
    assert served.wait_idle()["kv_cache_usage_perc"] == 0
    assert served.get("/health").status_code == 200


def test_failing_step_in_a_full_batch(served, poisoned):
    """Co-batched requests fail with it (500 internal_error, never a hang or a wrong text); a
    stream gets the error event and [DONE]; afterwards the same prompts give the offline text."""
    good = LOAD_PROMPTS[:8]
    out = _concurrently(served, [*good, "POISON " + PROMPT])
    _check_failed(out["POISON " + PROMPT])
    for p in good:
        if out[p].status_code == 200:
            assert out[p].json()["choices"][0]["text"] == served.reference[p]
        else:
            _check_failed(out[p])
    with httpx.stream("POST", served.base_url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "POISON", "max_tokens": 4, "stream": True}) as resp:
        lines = [x for x in resp.iter_lines() if x.startswith("data: ")]
    assert json.loads(lines[-2][6:])["error"]["code"] == "internal_error"
    assert lines[-1] == "data: [DONE]"
    assert served.wait_idle()["kv_cache_usage_perc"] == 0
    again = _concurrently(served, good)
    assert all(again[p].json()["choices"][0]["text"] == served.reference[p] for p in good)
