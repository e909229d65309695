"""The shared intake (InputProcessor) offline: chat forms, template arguments, range checks, admission.

The server tests (tests/server/test_intake.py) send the same inputs over HTTP; both go through one
InputProcessor, so the offline and served prompts are equal by construction and by test.
"""
from __future__ import annotations

import time

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.input_processor import InvalidRequest
from tests.engine.tiny import build_tiny_llama

TEMPLATE = (
    "{% if tools %}[tools:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}]{% endif %}"
    "{% if style %}[style:{{ style }}]{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if not (loop.last and continue_final_message) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny_intake"))
    return LLM(str(path), dtype="float32", page_size=4, num_kv_pages=32, max_num_seqs=4,
               max_num_batched_tokens=32, max_model_len=64)


def _render(llm, conversation, **kw):
    return llm.apply_chat_template(conversation, TEMPLATE, **kw)["prompt"]


def test_text_parts_render_like_a_string(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                          {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hi\nthere"}]
    assert _render(llm, parts) == _render(llm, plain)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    got = llm.chat(parts, params, use_tqdm=False, chat_template=TEMPLATE)[0]
    want = llm.chat(plain, params, use_tqdm=False, chat_template=TEMPLATE)[0]
    assert got.prompt_token_ids == want.prompt_token_ids
    assert got.outputs[0].token_ids == want.outputs[0].token_ids


def test_image_parts_are_refused_by_name(llm):
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(ValueError, match="image_url"):
        llm.chat(msg, use_tqdm=False)


def test_tools_kwargs_and_continue_final_message_reach_the_template(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    text = _render(llm, conv, tools=tools, chat_template_kwargs={"style": "terse"},
                   add_generation_prompt=False, continue_final_message=True)
    assert text.startswith("[tools:get_weather;][style:terse]")
    assert text.endswith("Hello, I am")  # the final message is continued, not closed
    with pytest.raises(ValueError, match="continue_final_message"):
        _render(llm, conv, continue_final_message=True)  # add_generation_prompt defaults to True
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        _render(llm, conv, chat_template_kwargs={"tokenize": True})


@pytest.mark.parametrize("prompt, match", [
    ([-1], "out of range"),
    ([[1, 2], [-5]], "out of range"),
    ([10**23], "out of range"),
    ("\ud800", "Unicode"),
    ({"prompt_token_ids": [1, "a"]}, "list of ints"),
    ({"text": "hi"}, "prompt_token_ids"),
    ([], "non-empty"),
])
def test_bad_prompts_are_value_errors_and_leave_nothing_queued(llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_lone_surrogate_in_chat_content_is_a_value_error(llm):
    with pytest.raises(ValueError, match="messages\\[0\\].content"):
        llm.chat([{"role": "user", "content": "a\udfffb"}], use_tqdm=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop_token_ids=[2147483648], min_tokens=1), "stop_token_ids"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
])
def test_params_the_device_cannot_hold_are_refused(llm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(["hi"], SamplingParams(**kwargs), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_top_k_beyond_the_vocabulary_means_off(llm):
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    huge = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, top_k=2**31)
    a, b = llm.generate(["hi", "hi"], [greedy, huge], use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    seeded = dict(temperature=1.0, max_tokens=4, ignore_eos=True, seed=3)
    a, b = llm.generate(["hi", "hi"], [SamplingParams(**seeded),
                                       SamplingParams(top_k=2**31, **seeded)], use_tqdm=False)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


@pytest.mark.parametrize("max_tokens", [None, 10**12])
def test_offline_generation_stops_at_the_context(llm, max_tokens):
    """vLLM's LLM.generate: no max_tokens, or one beyond the context, runs to max_model_len."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = llm.generate(["hi"], params, use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64
    assert out.outputs[0].finish_reason == "length"


def test_start_up_refuses_a_context_the_pool_cannot_hold(tmp_path):
    path = build_tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match="max_model_len=64 needs 16 KV pages but the pool holds 8"):
        LLM(str(path), dtype="float32", page_size=4, num_kv_pages=8, max_model_len=64)


def test_request_template_render_has_a_time_limit(llm):
    inputs = llm.llm_engine.input_processor
    slow = ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
            "{{ messages[0]['content'] }}")
    old, inputs.template_timeout = inputs.template_timeout, 0.5
    try:
        start = time.monotonic()
        with pytest.raises(InvalidRequest, match="did not render within") as info:
            inputs.render_chat([{"role": "user", "content": "x"}], chat_template=slow,
                               untrusted_template=True)
        assert time.monotonic() - start < 5
        assert info.value.param == "chat_template"
    finally:
        inputs.template_timeout = old
    # The model's own template renders without the hook, and still works afterwards.
    assert "x" in inputs.render_chat([{"role": "user", "content": "x"}])
