"""Every error status in OpenAI's shape, through the SDK where it has a type for it, and proof that
bad requests leave a concurrent good one untouched."""
from __future__ import annotations

import dataclasses
import threading

import httpx
import openai
import pytest

from tests.server.conftest import LOAD_MAX_TOKENS, LOAD_PROMPTS, MODEL, override

PROMPT = LOAD_PROMPTS[0]


def _assert_shape(body: dict, param: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize("kw, param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=2.5), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=1000), "n"),
    (dict(logprobs=1000), "logprobs"),
    (dict(prompt="a b c " * 200), "prompt"),
    (dict(max_tokens=127), "prompt"),  # prompt + max_tokens > --max-model-len 128
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[10**6]), None),  # token id out of the vocabulary: the engine's ValueError
])
def test_bad_completion_fields_are_400(client, kw, param):
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kw)
    _assert_shape(info.value.body if "error" in info.value.body else
                  {"error": info.value.body}, None)
    assert info.value.status_code == 400
    if param is not None:
        assert info.value.param == param


def test_bad_chat_fields_are_400(client):
    cases = [dict(messages=[]), dict(top_logprobs=2), dict(logprobs=True, top_logprobs=100),
             dict(max_completion_tokens=0), dict(messages=[{"content": "no role"}])]
    for extra in cases:
        kw = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**kw)


def test_raw_error_bodies(served):
    resp = served.post("/v1/completions", content=b"{not json", headers={
        "content-type": "application/json"})
    assert resp.status_code == 400
    _assert_shape(resp.json())
    resp = served.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": "many"})
    assert resp.status_code == 400
    _assert_shape(resp.json(), "max_tokens")
    resp = served.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [
        {"role": "user", "content": "hi"}]})
    assert resp.status_code == 404
    _assert_shape(resp.json(), "model")
    assert resp.json()["error"]["code"] == "model_not_found"


def test_unknown_model_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert info.value.code == "model_not_found"


def test_oversized_body_413(served):
    limit = served.app.max_body_bytes
    resp = served.post("/v1/completions", json={"model": MODEL, "prompt": "x" * (limit + 10)})
    assert resp.status_code == 413
    _assert_shape(resp.json())

    def chunks():  # no Content-Length: the gate counts what actually arrives
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    resp = served.post("/v1/completions", content=chunks())
    assert resp.status_code == 413


def test_api_key_401(served):
    with override(served.app, api_key=b"s3cret"):
        bad = openai.OpenAI(base_url=served.base_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        resp = httpx.get(served.base_url + "/v1/models")
        assert resp.status_code == 401
        _assert_shape(resp.json())
        good = openai.OpenAI(base_url=served.base_url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == MODEL
        assert served.get("/health").status_code == 200  # probes need no key


def test_overload_503_with_retry_after(client, served):
    serving = served.app.serving
    config = dataclasses.replace(serving.config, max_waiting_requests=0)
    with override(serving, config=config):
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "1"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices


def test_bad_requests_do_not_disturb_a_stream(client, served):
    result = {}

    def good():
        stream = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0,
                                           max_tokens=LOAD_MAX_TOKENS, stream=True)
        result["text"] = "".join(c.choices[0].text for c in stream)

    thread = threading.Thread(target=good)
    thread.start()
    for body in ({"prompt": PROMPT, "max_tokens": -5}, {"prompt": [10**6]},
                 {"prompt": "a " * 500}, {"messages": "nope"}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert served.post(path, json=body).status_code == 400
    thread.join(60)
    assert result["text"] == served.reference[PROMPT]
    gauges = served.wait_idle()
    assert gauges["num_requests_running"] == 0 and gauges["kv_cache_usage_perc"] == 0


def test_reset_prefix_cache_409_while_busy_then_forgets(client, served):
    allocator = served.app.serving.async_engine.engine.scheduler.allocator
    prompt = " ".join(LOAD_PROMPTS[:8])  # several full 16-token pages
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    served.wait_idle()
    assert allocator.num_cached_pages > 0
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=80, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the request is running now
    resp = served.post("/reset_prefix_cache")
    assert resp.status_code == 409
    _assert_shape(resp.json())
    assert [c.choices[0].finish_reason for c in stream][-1] == "length"  # unharmed, ran to the end
    served.wait_idle()
    assert served.post("/reset_prefix_cache").status_code == 200
    assert allocator.num_cached_pages == 0
