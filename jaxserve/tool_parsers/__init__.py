"""Tool-call parsers: the model's text -> OpenAI `tool_calls` (whole and streamed).

`--tool-call-parser NAME` picks one of TOOL_PARSERS for tool_choice "auto"; "required" and named
choices use forced.py's parsers over the grammar-shaped output.
"""
from __future__ import annotations

from jaxserve.tool_parsers.base import ToolCall, ToolCallStream, ToolParser
from jaxserve.tool_parsers.forced import (NamedToolParser, RequiredToolParser, named_schema,
                                          required_schema)
from jaxserve.tool_parsers.hermes import HermesToolParser
from jaxserve.tool_parsers.llama3_json import Llama3JsonToolParser
from jaxserve.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name=}; known: {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


__all__ = ["TOOL_PARSERS", "NamedToolParser", "RequiredToolParser", "ToolCall", "ToolCallStream",
           "ToolParser", "get_tool_parser", "named_schema", "required_schema"]
