"""Tool-call and reasoning parsers on plain text: whole extraction, and streaming over every
split (each prefix's parse extends the previous one, and the stream's chunks add up to extract)."""
import json

import jsonschema
import pytest

from jaxserve.reasoning import get_reasoning_parser
from jaxserve.tool_parsers import (NamedToolParser, RequiredToolParser, ToolCallStream,
                                   get_tool_parser, named_schema, required_schema)
from jaxserve.tool_parsers.chat import ChatOutputParser

W = '{"name": "get_weather", "arguments": {"city": "Paris", "units": ["c", "{}"]}}'
W_ARGS = '{"city": "Paris", "units": ["c", "{}"]}'
T = '{"name": "get_time", "arguments": {"tz": "UTC \\"x\\" </tool_call>"}}'
T_ARGS = '{"tz": "UTC \\"x\\" </tool_call>"}'

# (parser, text, expected content, expected [(name, arguments)])
CASES = [
    ("hermes", "Hello, no tools here.  ", "Hello, no tools here.  ", []),
    ("hermes", "a <tool_cal b", "a <tool_cal b", []),
    ("hermes", f"<tool_call>\n{W}\n</tool_call>", None, [("get_weather", W_ARGS)]),
    ("hermes", f"Let me check.\n\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n"
               "</tool_call>\nDone.", "Let me check.Done.",
     [("get_weather", W_ARGS), ("get_time", T_ARGS)]),
    ("hermes", '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', None,
     [("f", '{"x": 1}')]),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None,
     [("f", '{"x": 1}')]),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', None, [("f", "{}")]),
    ("hermes", "<tool_call>not json</tool_call> tail", "<tool_call>not json</tool_call>tail",
     []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2', None, [("f", '{"a": [1, 2')]),
    ("llama3_json", W.replace("arguments", "parameters"), None, [("get_weather", W_ARGS)]),
    ("llama3_json", "<|python_tag|>" + W + "; " + T, None,
     [("get_weather", W_ARGS), ("get_time", T_ARGS)]),
    ("llama3_json", "The weather is nice.", "The weather is nice.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3_json", "<|pyth", "<|pyth", []),
    ("mistral", f"[TOOL_CALLS][{W}, {T}]", None, [("get_weather", W_ARGS), ("get_time", T_ARGS)]),
    ("mistral", f"Checking. [TOOL_CALLS]get_weather[ARGS]{W_ARGS}[TOOL_CALLS]get_time[ARGS]"
                f"{T_ARGS}", "Checking.", [("get_weather", W_ARGS), ("get_time", T_ARGS)]),
    ("mistral", "No calls [TOOL_CA", "No calls [TOOL_CA", []),
]


def _stream(parser, chunks: list[str]):
    """Feed cumulative text chunk by chunk; the joined content and per-index calls."""
    stream, text, content, calls = ToolCallStream(parser), "", "", {}
    for i, chunk in enumerate(chunks):
        text += chunk
        new, deltas = stream.update(text, final=i == len(chunks) - 1)
        content += new
        for d in deltas:
            if "id" in d:
                assert d["index"] not in calls, "a call announced twice"
                assert d["type"] == "function" and d["id"].startswith("chatcmpl-tool-")
                calls[d["index"]] = [d["function"]["name"], ""]
            calls[d["index"]][1] += d["function"].get("arguments", "")
    return content, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_extract(name, text, content, calls):
    got_content, got_calls = get_tool_parser(name).extract(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_stream_every_split_adds_up(name, text, content, calls):
    parser = get_tool_parser(name)
    for k in range(len(text) + 1):
        got = _stream(parser, [text[:k], text[k:]])
        assert got == (content or "", calls), k
    assert _stream(parser, list(text)) == (content or "", calls)  # one character at a time


@pytest.mark.parametrize("name, text, content, calls", CASES)
def test_parse_of_prefixes_only_grows(name, text, content, calls):
    """The property streaming rests on: any split works if each prefix's parse extends the last."""
    parser = get_tool_parser(name)
    before = parser.parse("", final=False)
    for k in range(1, len(text) + 1):
        now = parser.parse(text[:k], final=k == len(text))
        assert now.content.startswith(before.content), (k, before.content, now.content)
        assert len(now.calls) >= len(before.calls)
        for old, new in zip(before.calls, now.calls):
            assert old.name == new.name and new.arguments.startswith(old.arguments), k
        before = now


def test_streamed_arguments_parse_as_json():
    for name, text, _, calls in CASES:
        for _, args in calls:
            if not args.endswith(("1, 2",)):
                json.loads(args)


def test_parallel_tool_calls_false_keeps_the_first():
    text = f"<tool_call>{W}</tool_call><tool_call>{T}</tool_call>"
    parser = ChatOutputParser(tools=get_tool_parser("hermes"), max_calls=1)
    msg, called = parser.message(text)
    assert called and [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]
    stream = ChatOutputParser(tools=get_tool_parser("hermes"), max_calls=1)
    deltas = [stream.delta(text[:k], k == len(text)) for k in range(len(text) + 1)]
    assert {c["index"] for d in deltas for c in d.get("tool_calls", [])} == {0}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"$ref": "#/$defs/city"}}, "required": ["city"],
    "$defs": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "noop"}}]


def test_required_and_named_schemas():
    schema = required_schema(TOOLS)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}},
                         {"name": "noop", "parameters": {}}], schema)
    for bad in ([], [{"name": "other", "parameters": {}}],
                [{"name": "get_weather", "parameters": {}}], [{"name": "noop"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "noop", "parameters": {}}] * 2, required_schema(TOOLS, False))
    assert named_schema(TOOLS, "get_weather")["required"] == ["city"]
    assert named_schema(TOOLS, "noop") == {"type": "object", "properties": {}}
    with pytest.raises(ValueError, match="'nope'"):
        named_schema(TOOLS, "nope")


def test_forced_parsers_stream_and_extract():
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "noop", ' \
           '"parameters": {}}]'
    want = [("get_weather", '{"city": "Paris"}'), ("noop", "{}")]
    assert [(c.name, c.arguments) for c in RequiredToolParser().extract(text)[1]] == want
    for k in range(len(text) + 1):
        assert _stream(RequiredToolParser(), [text[:k], text[k:]]) == ("", want)
    named = NamedToolParser("get_weather")
    assert named.extract(' {"city": "Paris"}')[1][0].arguments == '{"city": "Paris"}'
    assert _stream(named, list(' {"city": "Paris"}')) == ("", [("get_weather", '{"city": "Paris"}')])
    assert named.finish_reason == "stop" and RequiredToolParser.finish_reason == "tool_calls"


REASONING = [
    ("deepseek_r1", "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n",
     "The answer is 4."),
    ("deepseek_r1", "<think>hmm</think>ok", "hmm", "ok"),
    ("deepseek_r1", "still thinking </thi", "still thinking </thi", None),
    ("qwen3", "<think>\nstep 1\n</think>\n\n42", "\nstep 1\n", "42"),
    ("qwen3", "Just the answer <think>", None, "Just the answer <think>"),
    ("qwen3", "<thin", None, "<thin"),
]


@pytest.mark.parametrize("name, text, reasoning, content", REASONING)
def test_reasoning_whole_and_every_split(name, text, reasoning, content):
    parser = get_reasoning_parser(name)
    assert parser.extract(text) == (reasoning, content)
    for k in range(len(text) + 1):
        stream = ChatOutputParser(reasoning=parser)
        parts = [stream.delta(text[:k], False), stream.delta(text, True)]
        got_r = "".join(p.get("reasoning_content", "") for p in parts)
        got_c = "".join(p.get("content", "") for p in parts)
        assert (got_r or None, got_c or None) == (reasoning, content), k


def test_reasoning_then_tool_calls():
    text = f"<think>weather?</think>\n<tool_call>{W}</tool_call>"
    parser = ChatOutputParser(get_reasoning_parser("qwen3"), get_tool_parser("hermes"))
    msg, called = parser.message(text)
    assert called and msg["reasoning_content"] == "weather?" and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": W_ARGS}
    assert parser.finish_reason("stop", called) == "tool_calls"
    assert parser.finish_reason("length", called) == "length"
    stream = ChatOutputParser(get_reasoning_parser("qwen3"), get_tool_parser("hermes"))
    deltas = [stream.delta(text[:k], k == len(text)) for k in range(len(text) + 1)]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "weather?"
    assert "".join(d.get("content", "") for d in deltas) == ""
    args = "".join(c["function"].get("arguments", "") for d in deltas
                   for c in d.get("tool_calls", []))
    assert args == W_ARGS and stream.streamed_calls


def test_unknown_parser_names():
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="qwen3"):
        get_reasoning_parser("nope")
