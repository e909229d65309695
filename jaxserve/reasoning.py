"""Reasoning parsers (`--reasoning-parser`): split a `<think>...</think>` model's text into
`reasoning_content` and `content`, whole or streamed.

Like tool_parsers, `parse(text, final)` reads the whole text so far and only grows as the text
grows (a half-written tag waits), so streaming sends the difference of two parses.
"""
from __future__ import annotations

from jaxserve.tool_parsers.base import held_back

START, END = "<think>", "</think>"


class ReasoningParser:
    """deepseek_r1: the chat template opens <think> in the prompt, so the output is reasoning up
    to </think> (a leading <think> is dropped; unclosed: all reasoning). qwen3: the model opens
    <think> itself; output that does not start with it is all content."""

    def __init__(self, name: str, starts_in_reasoning: bool):
        self.name = name
        self.starts_in_reasoning = starts_in_reasoning

    def parse(self, text: str, final: bool) -> tuple[str | None, str]:
        """-> (reasoning or None when the output has none, content)."""
        lead = text.lstrip()
        if lead.startswith(START):
            body = lead[len(START):]
        elif not final and START.startswith(lead):  # empty, or a half-written <think>
            return (("" if self.starts_in_reasoning else None), "")
        elif self.starts_in_reasoning:
            body = text
        else:
            return None, text
        k = body.find(END)
        if k < 0:
            return (body if final else body[:len(body) - held_back(body, (END,))]), ""
        return body[:k], body[k + len(END):].lstrip()

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """Non-streaming: (reasoning_content, content), None where empty."""
        reasoning, content = self.parse(text, final=True)
        return reasoning, (content or None)


REASONING_PARSERS = {"deepseek_r1": True, "qwen3": False}  # name -> starts_in_reasoning


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name=}; known: {sorted(REASONING_PARSERS)}")
    return ReasoningParser(name, REASONING_PARSERS[name])
