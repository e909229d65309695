"""Fuzzing request bodies (hypothesis, bounded: FUZZ_EXAMPLES per route, no deadline) for
/v1/completions and /v1/chat/completions: never a 5xx, never a hang (60 s client timeout), errors
always in OpenAI's shape, and a concurrent well-formed greedy request keeps its offline output."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import LOAD_MAX_TOKENS, LOAD_PROMPTS, MODEL

FUZZ_EXAMPLES = 100
PROMPT = LOAD_PROMPTS[1]

_text = st.one_of(st.text(max_size=12), st.sampled_from(["\ud800", "a\udfffb", "\x00", "é" * 5,
                                                         "Hello", "{{ 7*7 }}", ""]))
_int = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**31 - 1, -2**31 - 1, 2**63,
                                                       10**23, 49151, 49152, 10**6]))
_num = st.one_of(_int, st.floats(allow_nan=False, allow_infinity=False, width=32),
                 st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308]))
_scalar = st.one_of(st.none(), st.booleans(), _int, _num, _text)
_value = st.one_of(_scalar, st.lists(_scalar, max_size=4), st.lists(_int, max_size=6),
                   st.dictionaries(_text, _scalar, max_size=3))
_token_ids = st.lists(_int, min_size=0, max_size=6)

_COMMON = {
    "model": st.one_of(st.just(MODEL), st.none(), _text), "max_tokens": _int,
    "temperature": _num, "top_p": _num, "top_k": _int, "min_p": _num, "n": _int, "seed": _int,
    "stop": st.one_of(_text, st.lists(_text, max_size=3)), "stop_token_ids": _token_ids,
    "presence_penalty": _num, "frequency_penalty": _num, "repetition_penalty": _num,
    "min_tokens": _int, "ignore_eos": _value, "stream": st.booleans(), "logprobs": _value,
    "skip_special_tokens": _value, "include_stop_str_in_output": _value, "best_of": _int,
    "bad_words": _value, "logit_bias": _value, "user": _value, "stream_options": _value,
    "response_format": _value, "unknown_field": _value,
}
_COMPLETION = {
    **_COMMON, "echo": _value, "suffix": _value, "prompt_logprobs": _value,
    "prompt": st.one_of(_text, st.lists(_text, max_size=3), _token_ids,
                        st.lists(_token_ids, max_size=3), _value),
}
_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), _text)},
    optional={"content": st.one_of(_text, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": _text}), max_size=2), _value),
        "name": _value})
_CHAT = {
    **_COMMON, "messages": st.one_of(st.lists(_message, max_size=3), _value),
    "max_completion_tokens": _int, "top_logprobs": _int, "add_generation_prompt": _value,
    "continue_final_message": _value, "chat_template_kwargs": _value, "tools": _value,
    "tool_choice": _value, "chat_template": st.one_of(st.none(), _text),
}


def _body(fields: dict) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional=fields)


def _post(served, path: str, body: dict) -> None:
    content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    with httpx.stream("POST", served.base_url + path, content=content, timeout=60,
                      headers={"content-type": "application/json"}) as resp:
        raw = resp.read().decode("utf-8", "replace")
    assert resp.status_code < 500, (body, resp.status_code, raw[:500])
    if resp.status_code != 200:
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"}, raw
    elif raw.startswith("data: "):
        assert raw.rstrip().endswith("data: [DONE]"), raw[-300:]
        assert '"error"' not in raw, (body, raw[-500:])


@pytest.fixture(scope="module")
def greedy_watch(served):
    """A well-formed greedy request, repeated for as long as the fuzzing runs."""
    stop, texts = threading.Event(), []

    def loop():
        while not stop.is_set():
            resp = served.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT,
                                                        "max_tokens": LOAD_MAX_TOKENS,
                                                        "temperature": 0})
            texts.append(resp.json()["choices"][0]["text"] if resp.status_code == 200
                         else resp.text)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(60)
    assert texts and all(t == served.reference[PROMPT] for t in texts), set(texts)


_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(body=_body(_COMPLETION))
def test_fuzz_completions(served, greedy_watch, body):
    _post(served, "/v1/completions", body)


@_SETTINGS
@given(body=_body(_CHAT))
def test_fuzz_chat(served, greedy_watch, body):
    _post(served, "/v1/chat/completions", body)


def test_fuzz_left_the_server_idle(served, greedy_watch):
    gauges = served.wait_idle(60)
    assert gauges["num_requests_running"] == 0 and gauges["kv_cache_usage_perc"] == 0
