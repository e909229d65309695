"""Llama 3.x JSON calls: the whole message is `{"name": ..., "parameters": {...}}` (optionally
after <|python_tag|>), several separated by `;`. A message that starts otherwise is content."""
from __future__ import annotations

from jaxserve.tool_parsers.base import Parsed, ToolParser, call_from_object
from jaxserve.tool_parsers.json_scan import scan_object, skip_ws

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True  # <|python_tag|>

    def parse(self, text: str, final: bool) -> Parsed:
        i = skip_ws(text, 0)
        if text.startswith(TAG, i):
            i = skip_ws(text, i + len(TAG))
        elif not final and TAG.startswith(text[i:]):  # empty, or a half-written tag
            return Parsed("")
        if i >= len(text) or text[i] != "{":
            return Parsed(text if final or i < len(text) else "")
        out, j = Parsed(""), i
        while True:
            scan = scan_object(text, j)
            call = call_from_object(text, j, scan, final)
            if call is None:  # open and unnamed (wait), or not a call (content from here)
                if scan.end is not None or scan.broken or final:
                    out.content = text if not out.calls else text[j:]
                return out
            out.calls.append(call)
            if scan.end is None or scan.broken:
                return out
            k = skip_ws(text, scan.end)
            if k < len(text) and text[k] == ";":
                k = skip_ws(text, k + 1)
            if k < len(text) and text[k] != "{":
                out.content = text[k:]
                return out
            if k >= len(text):
                return out
            j = k
