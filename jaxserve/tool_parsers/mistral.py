"""Mistral calls after the [TOOL_CALLS] token: a JSON array `[{"name": ..., "arguments": {...}}]`
(v3 tokenizers) or `name[ARGS]{...}` (v11+), repeated with [TOOL_CALLS] between calls."""
from __future__ import annotations

from jaxserve.tool_parsers.base import (Parsed, PartialCall, ToolParser, call_from_object,
                                        held_back, scan_calls_array)
from jaxserve.tool_parsers.json_scan import scan_object, scan_value, skip_ws

TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS] is a control token

    def parse(self, text: str, final: bool) -> Parsed:
        k = text.find(TAG)
        if k < 0:
            if final:
                return Parsed(text)
            return Parsed(text[:len(text) - held_back(text, (TAG,))].rstrip())
        out = Parsed(text[:k].rstrip())
        j = skip_ws(text, k + len(TAG))
        if j >= len(text):
            return out
        if text[j] == "[":
            out.calls = scan_calls_array(text, j, final)[0]
        elif text[j] == "{":
            call = call_from_object(text, j, scan_object(text, j), final)
            out.calls = [call] if call is not None else []
        else:
            self._named_args(text, j, final, out)
        return out

    @staticmethod
    def _named_args(text: str, j: int, final: bool, out: Parsed) -> None:
        """`name[ARGS]{...}` calls from text[j:], each after the first behind another TAG."""
        while True:
            a = text.find(ARGS, j)
            if a < 0:
                return
            s = skip_ws(text, a + len(ARGS))
            end = scan_value(text, s) if s < len(text) else None
            args = text[s:len(text) if end is None else end]
            if end is None and final and not args:
                args = "{}"
            out.calls.append(PartialCall(text[j:a].strip(), args))
            if end is None:
                return
            m = skip_ws(text, end)
            if not text.startswith(TAG, m):
                return
            j = skip_ws(text, m + len(TAG))
