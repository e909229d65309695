"""Tool-call parsing shared by every format: model text -> content + calls, and the stream diff.

A parser's `parse(text, final)` reads the whole text so far and must only grow as the text grows
(content is extended, calls appear in order, a call's arguments are extended): so streaming is
"parse the cumulative text, send what is new" (ToolCallStream), and `extract` is the same parse
at the end; the chunks of any split of the text add up to what `extract` returns.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from jaxserve.tool_parsers.json_scan import ObjectScan, scan_object, skip_ws

ARGUMENT_KEYS = ("arguments", "parameters")  # Hermes/Mistral say arguments, Llama 3 parameters


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass
class PartialCall:
    """One call as far as the text goes: shown once its name is known."""

    name: str
    arguments: str  # JSON text, a prefix until the call is done


@dataclass
class Parsed:
    content: str  # text outside calls that is safe to show (a possible marker start held back)
    calls: list[PartialCall] = field(default_factory=list)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def held_back(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker (it may become
    the marker with more text, so it is not shown yet)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:n]):
                best = n
                break
    return best


def call_from_object(text: str, start: int, scan: ObjectScan, done: bool) -> PartialCall | None:
    """The call described by the object text[start:] (scanned): None until its name is known.
    done: no more text will come for it (arguments missing -> "{}")."""
    span = scan.members.get("name")
    if span is None or span[1] is None or text[span[0]] != '"':
        return None
    name = json.loads(text[span[0]:span[1]])
    args_span = next((scan.members[k] for k in ARGUMENT_KEYS if k in scan.members), None)
    finished = done or scan.end is not None or scan.broken
    if args_span is None:
        return PartialCall(name, "{}" if finished else "")
    a, b = args_span
    if text[a] in "{[":  # raw text: streams as it is written
        return PartialCall(name, text[a:len(text) if b is None else b])
    if b is None:  # a string or literal: shown whole, once complete
        return PartialCall(name, "")
    value = json.loads(text[a:b]) if text[a] == '"' else text[a:b]
    return PartialCall(name, value if isinstance(value, str) else json.dumps(value))


def scan_calls_array(text: str, i: int, final: bool) -> tuple[list[PartialCall], int | None, bool]:
    """A JSON array of call objects at text[i] == '[': (calls, end after ']' or None, broken)."""
    calls, j = [], skip_ws(text, i + 1)
    while j < len(text):
        if text[j] == "]":
            return calls, j + 1, False
        if text[j] != "{":
            return calls, None, True
        scan = scan_object(text, j)
        call = call_from_object(text, j, scan, final)
        if call is not None:
            calls.append(call)
        if scan.end is None or scan.broken:
            return calls, None, scan.broken
        j = skip_ws(text, scan.end)
        if j < len(text) and text[j] == ",":
            j = skip_ws(text, j + 1)
    return calls, None, False


class ToolParser:
    """Base of the formats: subclasses implement parse()."""

    name = ""
    # Markers that are special tokens: the request must keep them in the text
    # (skip_special_tokens=False), as vLLM's parsers ask.
    needs_special_tokens = False
    finish_reason = "tool_calls"  # what a response with calls ends with

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Non-streaming: (content or None, calls). Text with no call comes back unchanged."""
        parsed = self.parse(text, final=True)
        calls = [ToolCall(c.name, c.arguments) for c in parsed.calls]
        if not calls:
            return parsed.content, []
        return (parsed.content if parsed.content.strip() else None), calls


class ToolCallStream:
    """Streaming: feed the cumulative text; get the new content and OpenAI delta.tool_calls."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None):
        self.parser = parser
        self.max_calls = max_calls  # parallel_tool_calls=false: 1
        self.sent_content = 0
        self.ids: list[str] = []
        self.sent_args: list[int] = []

    @property
    def num_calls(self) -> int:
        return len(self.ids)

    def update(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        parsed = self.parser.parse(text, final)
        content = parsed.content[self.sent_content:]
        self.sent_content = len(parsed.content)
        deltas = []
        for i, call in enumerate(parsed.calls[:self.max_calls]):
            delta: dict = {"index": i}
            if i == len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                delta.update(id=self.ids[i], type="function")
                delta["function"] = {"name": call.name, "arguments": ""}
            new = call.arguments[self.sent_args[i]:]
            if new:
                delta.setdefault("function", {})["arguments"] = new
                self.sent_args[i] = len(call.arguments)
            if "function" in delta:
                deltas.append(delta)
        return content, deltas
