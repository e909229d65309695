"""Hermes-style calls (Qwen2/2.5/3, Hermes 2/3): `<tool_call>\n{"name": ..., "arguments": {...}}
\n</tool_call>` blocks, any number, with content before, between and after them."""
from __future__ import annotations

from jaxserve.tool_parsers.base import Parsed, ToolParser, call_from_object, held_back
from jaxserve.tool_parsers.json_scan import scan_object, skip_ws

START, END = "<tool_call>", "</tool_call>"


def _segment(seg: str, after_block: bool, before_block: bool) -> str:
    """Content between blocks loses the whitespace that only separates it from a block."""
    seg = seg.lstrip() if after_block else seg
    return seg.rstrip() if before_block else seg


class HermesToolParser(ToolParser):
    name = "hermes"

    def parse(self, text: str, final: bool) -> Parsed:
        out, pos, after_block = Parsed(""), 0, False
        while True:
            k = text.find(START, pos)
            if k < 0:  # the tail: trailing whitespace and a half-written <tool_call> wait
                tail = text[pos:]
                if not final:
                    tail = tail[:len(tail) - held_back(tail, (START,))]
                out.content += _segment(tail, after_block, not final or bool(out.calls))
                return out
            out.content += _segment(text[pos:k], after_block, True)
            end = self._block(text, k, final, out)
            if end is None:
                return out
            pos, after_block = end, True

    @staticmethod
    def _block(text: str, k: int, final: bool, out: Parsed) -> int | None:
        """Parse the block at text[k:] into `out`; the index after its END, or None if open."""
        j = skip_ws(text, k + len(START))
        if j < len(text) and text[j] == "{":
            scan = scan_object(text, j)
            call = call_from_object(text, j, scan, final)
            if call is not None:
                out.calls.append(call)
            closed = scan.end is not None or scan.broken
            e = text.find(END, scan.end or j) if closed else -1
        else:
            call, e = None, (text.find(END, j) if j < len(text) else -1)
        block_end = None if e < 0 else e + len(END)
        if call is None and (block_end is not None or final):  # not a call: shown as written
            out.content += text[k:block_end]
        return block_end
