"""The server's intake: issue 12's reproducers (one request must not kill the engine, every bad
value a 400 naming it) and issue 11's refusals (fields jaxserve lacks are named, never ignored)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from tests.server.conftest import LOAD_PROMPTS, MODEL

PROMPT = LOAD_PROMPTS[0]


def _post_raw(served, path: str, text: str):
    """Post a JSON text as is (json= would refuse to encode a lone surrogate)."""
    return served.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def _error(resp, status: int, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    return err


def _still_serving(served):
    assert served.get("/health").status_code == 200
    resp = served.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                "max_tokens": 3, "temperature": 0})
    assert resp.status_code == 200, resp.text


def test_top_k_beyond_int32_is_served_as_off(served):
    resp = served.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2,
                                                "top_k": 2147483648})
    assert resp.status_code == 200, resp.text
    _still_serving(served)


@pytest.mark.parametrize("body, param", [
    ({"stop_token_ids": [2147483648], "min_tokens": 1}, "stop_token_ids"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [[1, 2], [-5]]}, "prompt"),
    ({"prompt": [10**23]}, "prompt"),
    ({"max_tokens": 10**15}, "prompt"),
    ({"logit_bias": {"x": 10}}, "logit_bias"),
    ({"logit_bias": {"99999999": 10}}, "logit_bias"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
     "response_format"),
    ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
    ({"use_beam_search": True}, "use_beam_search"),
])
def test_bad_or_unimplemented_completion_fields_are_400(served, body, param):
    resp = served.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                "max_tokens": 2, **body})
    _error(resp, 400, param)
    _still_serving(served)


def test_token_controls_are_served(served):
    """logit_bias (OpenAI's string keys), allowed_token_ids and a JSON response_format."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    free = served.post("/v1/completions", json=body).json()["choices"][0]["text"]
    tok = served.app_tokenizer if hasattr(served, "app_tokenizer") else None
    biased = served.post("/v1/completions", json={**body, "logit_bias": {"33": 100}})
    assert biased.status_code == 200, biased.text
    only = served.post("/v1/completions", json={**body, "allowed_token_ids": [33]})
    assert only.status_code == 200, only.text
    assert biased.json()["choices"][0]["text"] == only.json()["choices"][0]["text"] != free
    del tok
    js = served.post("/v1/completions", json={**body, "max_tokens": 40, "temperature": 1.0,
                                              "response_format": {"type": "json_object"}})
    assert js.status_code == 200, js.text
    choice = js.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        import json
        assert isinstance(json.loads(choice["text"]), dict)


def test_unknown_and_off_fields_are_accepted(served):
    resp = served.post("/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 2, "some_future_field": 1,
        "logit_bias": None, "use_beam_search": False, "response_format": None})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("path, text, param", [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
     "messages[0].content"),
    ("/v1/completions", '{"model": "\\ud800", "prompt": "hi", "max_tokens": 2}', "model"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
])
def test_lone_surrogates_are_400(served, path, text, param):
    _error(_post_raw(served, path, text), 400, param)
    _still_serving(served)


def _chat(served, messages, **kw):
    return served.post("/v1/chat/completions", json={"model": MODEL, "messages": messages,
                                                     "max_tokens": 3, "temperature": 0, **kw})


def test_chat_text_parts_equal_the_string_and_offline(served):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                          {"type": "text", "text": "world"}]}]
    plain = [{"role": "user", "content": "Hello\nworld"}]
    a, b = _chat(served, parts), _chat(served, plain)
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
    tok = served.post("/tokenize", json={"messages": parts}).json()["tokens"]
    offline = served.app.serving.inputs.chat_prompt(parts).token_ids
    assert tok == offline
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert "image_url" in _error(_chat(served, image), 400, "messages[0].content")["message"]


def test_tool_choice_auto_needs_the_flag_required_is_enforced(served):
    """auto needs --enable-auto-tool-choice (vLLM's rule); required is a grammar: the tiny random
    model always returns a call of a declared function with arguments matching its schema."""
    params = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    msgs = [{"role": "user", "content": "Hi"}]
    _error(_chat(served, msgs, tools=tools), 400, "tool_choice")
    assert _chat(served, msgs, tools=tools, tool_choice="none").status_code == 200
    # The random model would pad the JSON with whitespace until max_tokens: bias it away.
    tok = served.app.serving.tokenizer
    spaces = {str(t): -100 for t in range(384) if any(c.isspace() for c in tok.decode([t]))}
    resp = _chat(served, msgs, tools=tools, tool_choice="required", max_tokens=100,
                 temperature=1.0, seed=1, logit_bias=spaces)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert calls and all(c["function"]["name"] == "f" for c in calls)
    assert all(isinstance(json.loads(c["function"]["arguments"])["ok"], bool) for c in calls)


def test_request_chat_template_needs_the_trust_flag(served):
    msgs = [{"role": "user", "content": "Hi"}]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _error(_chat(served, msgs, chat_template=template), 400, "chat_template")
    serving = served.app.serving
    old = serving.config
    serving.config = dataclasses.replace(old, trust_request_chat_template=True)
    try:
        assert _chat(served, msgs, chat_template=template).status_code == 200
    finally:
        serving.config = old


def test_waiting_bound_counts_sequences(served):
    serving = served.app.serving
    old = serving.config
    serving.config = dataclasses.replace(old, max_waiting_requests=3)
    try:
        resp = served.post("/v1/completions", json={"model": MODEL, "prompt": [PROMPT] * 4,
                                                    "max_tokens": 2})
        _error(resp, 503, None)
        resp = served.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "n": 4,
                                                    "max_tokens": 2})
        _error(resp, 503, None)
        resp = served.post("/v1/completions", json={"model": MODEL, "prompt": [PROMPT] * 3,
                                                    "max_tokens": 2})
        assert resp.status_code == 200, resp.text
    finally:
        serving.config = old
    assert json.loads(served.post("/v1/completions", json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 2}).text)["choices"]


def test_prompt_logprobs_are_served(served):
    """vLLM's prompt_logprobs: per prompt token None (the first) or the top-k by rank plus the
    prompt's own token, equal to echo+logprobs' numbers; with stream=true a 400 naming it."""
    ids = served.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()["tokens"]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    echo = served.post("/v1/completions", json={**body, "echo": True, "logprobs": 1}).json()
    token_lps = echo["choices"][0]["logprobs"]["token_logprobs"][:len(ids)]
    resp = served.post("/v1/completions", json={**body, "prompt_logprobs": 2})
    assert resp.status_code == 200, resp.text
    plp = resp.json()["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for i in range(1, len(ids)):
        entry = plp[i]
        assert entry[str(ids[i])]["logprob"] == pytest.approx(token_lps[i], abs=1e-4)
        ranked = sorted((v["rank"] for v in entry.values() if v["rank"] is not None))
        assert ranked[:2] == [1, 2] and len(entry) <= 3
    chat = _chat(served, [{"role": "user", "content": "Hi"}], prompt_logprobs=1)
    assert chat.status_code == 200 and chat.json()["prompt_logprobs"][0] is None
    _error(served.post("/v1/completions", json={**body, "prompt_logprobs": 1, "stream": True}),
           400, "prompt_logprobs")
