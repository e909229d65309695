"""A forgiving scanner for JSON that is still being written: where values start and end in a
prefix of the model's text, so tool-call arguments stream as raw text slices that only grow."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

_WS = " \t\n\r"
_LITERAL_END = ",}] \t\n\r"


class Malformed(ValueError):
    """The text is not (the start of) what the scanner expects at `pos`."""

    def __init__(self, pos: int):
        super().__init__(f"unexpected character at {pos}")
        self.pos = pos


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def scan_string(text: str, i: int) -> int | None:
    """text[i] == '"': the index after the closing quote, or None if the text ends first."""
    j = i + 1
    while j < len(text):
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return None


def scan_value(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at text[i], or None if the text ends before it
    does. Containers are matched by bracket depth outside strings (not validated inside)."""
    c = text[i]
    if c == '"':
        return scan_string(text, i)
    if c in "{[":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == '"':
                j = scan_string(text, j)
                if j is None:
                    return None
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # number, true, false, null: ends at a delimiter (at the text's end it may go on)
    while j < len(text) and text[j] not in _LITERAL_END:
        j += 1
    return j if j < len(text) else None


@dataclass
class ObjectScan:
    """What is known of one JSON object in a prefix: its members' value spans (first occurrence
    of a key wins), whether it closed, and whether it broke off (malformed) somewhere."""

    members: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> [start, end)
    end: int | None = None  # index after "}" once closed
    broken: bool = False  # malformed after the members above: the object never completes


def scan_object(text: str, i: int) -> ObjectScan:
    """text[i] == '{': scan members until the text ends, the object closes or it is malformed."""
    out = ObjectScan()
    try:
        j = skip_ws(text, i + 1)
        while j < len(text):
            if text[j] == "}" and not out.members:
                out.end = j + 1
                return out
            if text[j] != '"':
                raise Malformed(j)
            key_end = scan_string(text, j)
            if key_end is None:
                return out
            key = json.loads(text[j:key_end])
            j = skip_ws(text, key_end)
            if j >= len(text):
                return out
            if text[j] != ":":
                raise Malformed(j)
            j = skip_ws(text, j + 1)
            if j >= len(text):
                return out
            value_end = scan_value(text, j)
            out.members.setdefault(key, (j, value_end))
            if value_end is None:
                return out
            j = skip_ws(text, value_end)
            if j >= len(text):
                return out
            if text[j] == "}":
                out.end = j + 1
                return out
            if text[j] != ",":
                raise Malformed(j)
            j = skip_ws(text, j + 1)
    except (Malformed, json.JSONDecodeError):
        out.broken = True
    return out
