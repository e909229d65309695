"""Tools in a chat request: OpenAI's tools/tool_choice -> a ToolPlan (what the template sees, how
the output is read, the grammar a forced choice needs), and assistant tool_calls for templates.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from jaxserve.sampling_params import StructuredOutputsParams
from jaxserve.server.protocol import APIError, ChatCompletionRequest
from jaxserve.tool_parsers import (NamedToolParser, RequiredToolParser, ToolParser,
                                   get_tool_parser, named_schema, required_schema)


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools: what the template sees and how the output is read."""

    tools: list[dict] | None = None  # to the chat template
    parser: ToolParser | None = None  # reads calls out of the output (None: plain content)
    grammar: StructuredOutputsParams | None = None  # required / named choices: the call's shape
    max_calls: int | None = None  # parallel_tool_calls=false: 1


def plan_tools(body: ChatCompletionRequest, auto_parser: str | None) -> ToolPlan:
    """tools + tool_choice (vLLM's rules) -> ToolPlan; APIError(400) naming the field.
    auto_parser: the --tool-call-parser under --enable-auto-tool-choice, else None."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(400, f"tool_choice={choice!r:.100} needs tools", param="tool_choice")
        return ToolPlan()
    tools = check_tools(body.tools)
    max_calls = 1 if body.parallel_tool_calls is False else None
    choice = "auto" if choice is None else choice  # OpenAI's default when tools are given
    if choice == "none":
        return ToolPlan(tools)
    if choice == "auto":
        if auto_parser is None:
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and '
                                '--tool-call-parser to be set; send tool_choice="none" to '
                                'only show the tools to the model', param="tool_choice")
        return ToolPlan(tools, get_tool_parser(auto_parser), max_calls=max_calls)
    if choice == "required":
        schema = required_schema(tools, parallel_tool_calls=max_calls is None)
        return ToolPlan(tools, RequiredToolParser(), StructuredOutputsParams(json=schema),
                        max_calls)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(name, str)):
        raise APIError(400, "tool_choice must be \"none\", \"auto\", \"required\" or "
                            '{"type": "function", "function": {"name": ...}}, got '
                            f"{choice!r:.100}", param="tool_choice")
    try:
        schema = named_schema(tools, name)
    except ValueError as e:
        raise APIError(400, str(e), param="tool_choice") from None
    return ToolPlan(tools, NamedToolParser(name), StructuredOutputsParams(json=schema), 1)


def check_tools(tools: list) -> list[dict]:
    """OpenAI's tools: [{"type": "function", "function": {"name", "parameters"?, ...}}]."""
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(function, dict) and tool.get("type", "function") == "function"
                and isinstance(function.get("name"), str) and function["name"]
                and isinstance(function.get("parameters", {}), (dict, type(None)))):
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                f"{{\"name\": str, \"parameters\": object}}}}, got {tool!r:.200}",
                           param=f"tools[{i}]")
    return tools


def template_messages(messages) -> list:
    """Assistant tool_calls as templates read them: arguments parsed from their JSON text into an
    object (vLLM does the same); other messages pass unchanged."""
    out = []
    for i, msg in enumerate(messages):
        calls = (getattr(msg, "model_extra", None) or {}).get("tool_calls")
        if not calls:
            out.append(msg)
            continue
        param = f"messages[{i}].tool_calls"
        if not isinstance(calls, list):
            raise APIError(400, f"{param} must be a list", param=param)
        fixed = []
        for j, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise APIError(400, f"{param}[{j}] needs function.name", param=f"{param}[{j}]")
            args = function.get("arguments") or {}
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    raise APIError(400, f"{param}[{j}].function.arguments is not JSON: "
                                        f"{args!r:.100}", param=f"{param}[{j}]") from None
            fixed.append({**call, "function": {**function, "arguments": args}})
        out.append({**msg.model_dump(exclude_none=True), "tool_calls": fixed})
    return out
