"""tool_choice "required" and a named function: the grammar makes the output a call (vLLM's
shapes), so parsing is reading that JSON: the arguments object alone for a named function, an
array of {"name", "parameters"} objects for "required"."""
from __future__ import annotations

from jaxserve.tool_parsers.base import Parsed, PartialCall, ToolParser, scan_calls_array
from jaxserve.tool_parsers.json_scan import skip_ws


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def required_schema(tools: list[dict], parallel_tool_calls: bool = True) -> dict:
    """tool_choice="required": a non-empty array of {"name": one tool, "parameters": its schema}
    (one item when parallel_tool_calls is false); the tools' $defs are lifted to the top."""
    items, defs = [], {}
    for tool in tools:
        params = dict(_parameters(tool))
        defs.update(params.pop("$defs", {}))
        items.append({"type": "object", "properties": {
            "name": {"type": "string", "enum": [tool["function"]["name"]]},
            "parameters": params}, "required": ["name", "parameters"],
            "additionalProperties": False})
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def named_schema(tools: list[dict], name: str) -> dict:
    """A named tool_choice: the function's parameters schema (ValueError if no tool has it)."""
    for tool in tools:
        if tool["function"]["name"] == name:
            return _parameters(tool)
    raise ValueError(f"tool_choice names function {name!r}, which is not in tools "
                     f"({[t['function']['name'] for t in tools]})")


class NamedToolParser(ToolParser):
    """The whole output is the arguments of `function_name`."""

    name = "named"
    finish_reason = "stop"  # OpenAI ends a forced function call with "stop"

    def __init__(self, function_name: str):
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> Parsed:
        args = text.lstrip()
        return Parsed("", [PartialCall(self.function_name, args or ("{}" if final else ""))])


class RequiredToolParser(ToolParser):
    """The output is [{"name": ..., "parameters": {...}}, ...]."""

    name = "required"

    def parse(self, text: str, final: bool) -> Parsed:
        i = skip_ws(text, 0)
        if i >= len(text):
            return Parsed(text if final else "")
        if text[i] != "[":
            return Parsed(text)
        return Parsed("", scan_calls_array(text, i, final)[0])
