"""Tool calling, reasoning and structured-output requests over HTTP with the openai SDK.

The tiny model writes no tool calls by itself, so its runner is wrapped (ScriptedRunner): the
engine runs as usual, but every sampled token is replaced by the next token of a given text, as
if the model (or a grammar) had written it. The response path (parsers, deltas, finish reasons)
is the real one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import openai
import pytest

from jaxserve.reasoning import get_reasoning_parser
from jaxserve.sampling_params import StructuredOutputsParams
from jaxserve.server.protocol import ChatCompletionRequest, structured_from_response_format
from jaxserve.tool_parsers import required_schema
from tests.server.conftest import MODEL, override

# Short names: the tiny tokenizer spends about a token per character and max_model_len is 128.
TOOLS = [{"type": "function", "function": {
    "name": "w", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"c": {"type": "string"}},
                   "required": ["c"]}}},
         {"type": "function", "function": {"name": "t", "parameters": {
             "type": "object", "properties": {"z": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "Hi"}]
CALL = '<tool_call>{"name":"w","arguments":{"c":"P"}}</tool_call>'
CALL2 = '<tool_call>{"name":"t","arguments":{"z":"C"}}</tool_call>'


class ScriptedRunner:
    """The engine's runner, except that sampled tokens follow `token_ids`, then EOS."""

    def __init__(self, runner, token_ids: list[int], eos: int):
        self._runner, self.token_ids, self.eos = runner, token_ids, eos

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def fetch(self, handle):
        out = self._runner.fetch(handle)
        ids = out.token_ids.copy()
        for b, seq in enumerate(handle.batch.seqs):
            n = len(seq.output_token_ids)
            ids[b] = self.token_ids[n] if n < len(self.token_ids) else self.eos
        out.token_ids = ids
        return out


@contextlib.contextmanager
def scripted(served, text: str, **server_config):
    """The served engine writes `text`; ServerConfig fields changed for the block."""
    served.wait_idle()
    serving = served.app.serving
    engine = serving.async_engine.engine
    ids = serving.tokenizer.encode(text, add_special_tokens=False)
    config = dataclasses.replace(serving.config, **server_config)
    reasoning = get_reasoning_parser(config.reasoning_parser) if config.reasoning_parser else None
    runner = ScriptedRunner(engine.runner, ids, serving.tokenizer.eos_token_id)
    with override(engine, runner=runner), override(serving, config=config, reasoning=reasoning):
        yield


HERMES = dict(enable_auto_tool_choice=True, tool_call_parser="hermes")


def _stream(client, **kw):
    """A streamed chat: (content, reasoning, {index: [id, name, arguments]}, finish_reason)."""
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        reasoning += getattr(choice.delta, "reasoning_content", None) or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls and d.type == "function"
                calls[d.index] = [d.id, d.function.name, ""]
            calls[d.index][2] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, reasoning, calls, finish


def test_auto_hermes_whole_and_streamed(served, client):
    with scripted(served, "Ok.\n" + CALL + "\n" + CALL2, **HERMES):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Ok."
        calls = choice.message.tool_calls
        assert [c.function.name for c in calls] == ["w", "t"]
        assert json.loads(calls[0].function.arguments) == {"c": "P"}
        assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function" for c in calls)
        content, _, streamed, finish = _stream(client, tools=TOOLS)
    assert content == "Ok." and finish == "tool_calls"
    assert [(v[1], json.loads(v[2])) for _, v in sorted(streamed.items())] == [
        ("w", {"c": "P"}), ("t", {"z": "C"})]
    assert len({v[0] for v in streamed.values()}) == 2


def test_auto_without_calls_and_parallel_false(served, client):
    with scripted(served, "It is sunny.", **HERMES):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                              tool_choice="auto")
    assert resp.choices[0].message.content == "It is sunny."
    assert not resp.choices[0].message.tool_calls and resp.choices[0].finish_reason == "stop"
    with scripted(served, CALL + CALL2, **HERMES):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                              parallel_tool_calls=False)
        _, _, streamed, _ = _stream(client, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in resp.choices[0].message.tool_calls] == ["w"]
    assert [v[1] for v in streamed.values()] == ["w"]


def test_reasoning_parser_whole_and_streamed(served, client):
    with scripted(served, "Hm.</think>\n\nSun. " + CALL,
                  reasoning_parser="deepseek_r1", **HERMES):
        msg = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                             tools=TOOLS).choices[0].message
        content, reasoning, calls, finish = _stream(client, tools=TOOLS)
    assert msg.reasoning_content == reasoning == "Hm."
    assert msg.content == content == "Sun."
    assert msg.tool_calls[0].function.name == calls[0][1] == "w"
    assert finish == "tool_calls"


def _error(resp, param: str, words: str = ""):
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and words in error["message"], error
    return error


def test_tool_choice_errors(served):
    def chat(**kw):
        return served.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES,
                                                          **kw})

    _error(chat(tools=TOOLS), "tool_choice", "--enable-auto-tool-choice")
    _error(chat(tool_choice="auto"), "tool_choice", "needs tools")
    _error(chat(tools=TOOLS, tool_choice="sometimes"), "tool_choice")
    _error(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
           "tool_choice", "'nope'")
    _error(chat(tools=[{"type": "function", "function": {"parameters": {}}}],
                tool_choice="none"), "tools[0]")
    # required and named choices run under the grammar mask (tests/server/test_intake.py checks
    # the call is valid)
    assert chat(tools=TOOLS, tool_choice="required", max_tokens=4).status_code == 200
    assert chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "t"}},
                max_tokens=4).status_code == 200
    assert chat(tools=TOOLS, tool_choice="none", max_tokens=2).status_code == 200


@contextlib.contextmanager
def captured_params(served):
    """Structured outputs switched on in serving; the SamplingParams reaching the engine kept."""
    seen = []
    async_engine = served.app.serving.async_engine
    add = async_engine.add

    async def spy(items):
        seen.extend(params for _, _, params in items)
        return await add(items)

    with override(served.app.serving, structured_outputs_enabled=True), \
            override(async_engine, add=spy):
        yield seen


def test_forced_choices_reach_the_engine_and_parse(served, client):
    required = '[{"name":"t","parameters":{"z":"U"}}]'
    with captured_params(served) as seen, scripted(served, required):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                              tool_choice="required")
        _, _, streamed, finish = _stream(client, tools=TOOLS, tool_choice="required")
    call = resp.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("t", {"z": "U"})
    assert resp.choices[0].finish_reason == finish == "tool_calls"
    assert streamed[0][1:] == ["t", '{"z":"U"}']
    assert seen[0].structured_outputs == StructuredOutputsParams(json=required_schema(TOOLS))
    named = {"type": "function", "function": {"name": "w"}}
    with captured_params(served) as seen, scripted(served, '{"c": "O"}'):
        resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                              tool_choice=named)
    call = resp.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("w", '{"c": "O"}')
    assert resp.choices[0].finish_reason == "stop"  # OpenAI's for a named function
    assert seen[0].structured_outputs.json == TOOLS[0]["function"]["parameters"]


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_response_format_translation():
    assert structured_from_response_format({"type": "text"}) is None
    assert structured_from_response_format({"type": "json_object"}).json_object is True
    strict = structured_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}})
    assert strict.json == SCHEMA and strict.disable_additional_properties
    loose = structured_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}})
    assert not loose.disable_additional_properties
    for bad in ({"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "yaml"}, {}):
        with pytest.raises(ValueError, match="response_format"):
            structured_from_response_format(bad)
    body = ChatCompletionRequest(messages=MESSAGES, guided_regex="a+",
                                 guided_whitespace_pattern=" ?")
    assert body.structured_outputs_params() == (
        StructuredOutputsParams(regex="a+", whitespace_pattern=" ?"), "guided_regex")


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_structured_output_requests(served, route):
    def post(**kw):
        prompt = {"messages": MESSAGES} if "chat" in route else {"prompt": "Hi"}
        return served.post(route, json={"model": MODEL, "max_tokens": 4, **prompt, **kw})

    bad_schema = {"type": "json_schema", "json_schema": {"name": "x",
                                                         "schema": {"type": "no-such-type"}}}
    _error(post(response_format=bad_schema), "response_format", "no-such-type")
    _error(post(response_format={"type": "json_schema"}), "response_format", "schema")
    _error(post(structured_outputs={"regex": "[a-"}), "structured_outputs", "regex")
    _error(post(structured_outputs={"grammar": "start: nowhere"}), "structured_outputs",
           "nowhere")
    _error(post(structured_outputs={"choice": ["a"], "regex": "b"}), "structured_outputs")
    _error(post(guided_json={"type": "object"}, response_format={"type": "json_object"}),
           "guided_json", "one output constraint")
    # well-formed ones run under the grammar mask
    assert post(response_format={"type": "json_object"}).status_code == 200
    resp = post(guided_choice=["yes", "no"], max_tokens=8)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    assert (choice.get("text") or choice.get("message", {}).get("content")) in {"yes", "no"}
    assert post(response_format={"type": "text"}).status_code == 200
    with captured_params(served) as seen:
        assert post(structured_outputs={"choice": ["yes", "no"]}).status_code == 200
    assert seen[0].structured_outputs == StructuredOutputsParams(choice=["yes", "no"])


TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }} {{ c.function.arguments.c }}\n{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}"
    "{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}{% endif %}"
    "<|im_start|>assistant\n")


def test_tool_messages_round_trip_through_the_template(served, client):
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "w", "arguments": '{"c": "P"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    serving = served.app.serving
    with override(serving, chat_template=TOOL_TEMPLATE):
        body = ChatCompletionRequest(model=MODEL, messages=messages, tools=TOOLS,
                                     tool_choice="none")
        prompt = serving.chat_prompt(body, TOOLS)["prompt"]
        resp = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                              tool_choice="none", max_tokens=2)
    assert 'CALL w {"c": "P"} P' in prompt  # arguments as an object
    assert "18C (for call_1)" in prompt and "TOOLS w,t" in prompt
    assert resp.choices[0].message.role == "assistant"
    bad = dict(messages[1], tool_calls=[{"function": {"name": "f", "arguments": "{oops"}}])
    with pytest.raises(openai.BadRequestError, match="not JSON"):
        client.chat.completions.create(model=MODEL, messages=[MESSAGES[0], bad], max_tokens=2)


def test_node_sdk_reads_tool_calls(served):
    """The openai npm client, whole and through its stream accumulator (tests/server/node)."""
    node_dir = Path(__file__).parent / "node"
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed")
    if not (node_dir / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=node_dir, check=True,
                       capture_output=True, timeout=300)
    with scripted(served, "Ok.\n" + CALL + "\n" + CALL2, **HERMES):
        proc = subprocess.run(["node", str(node_dir / "tools.mjs"), served.base_url + "/v1",
                               MODEL, json.dumps(TOOLS)], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    want = [("w", {"c": "P"}), ("t", {"z": "C"})]
    for prefix in ("", "stream_"):
        calls = out[prefix + "calls"]
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == want, out
        assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function"
                   for c in calls)
        assert out[prefix + "finish_reason"] == "tool_calls" and out[prefix + "content"] == "Ok."
