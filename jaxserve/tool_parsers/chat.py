"""One chat choice's text -> the assistant message's fields (reasoning_content, content,
tool_calls), whole (`message`) or as stream deltas (`delta` on the cumulative text).

The reasoning parser splits off the thought first; the tool parser reads only the content.
"""
from __future__ import annotations

from jaxserve.reasoning import ReasoningParser
from jaxserve.tool_parsers.base import ToolCallStream, ToolParser


class ChatOutputParser:
    """Per choice (it keeps what a stream has sent). Either parser may be None."""

    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None,
                 max_calls: int | None = None):
        self.reasoning, self.tools, self.max_calls = reasoning, tools, max_calls
        self._calls = ToolCallStream(tools, max_calls) if tools is not None else None
        self._sent_reasoning = self._sent_content = 0

    def _split(self, text: str, final: bool) -> tuple[str | None, str]:
        if self.reasoning is None:
            return None, text
        return self.reasoning.parse(text, final)

    def message(self, text: str) -> tuple[dict, bool]:
        """The whole message and whether it holds tool calls."""
        reasoning, content = self._split(text, final=True)
        msg: dict = {"role": "assistant", "content": content}
        if self.reasoning is not None:
            msg["reasoning_content"] = reasoning or None
            msg["content"] = content or None
        if self.tools is None:
            return msg, False
        msg["content"], calls = self.tools.extract(content)
        calls = calls[:self.max_calls]
        if calls:
            msg["tool_calls"] = [c.to_openai() for c in calls]
        return msg, bool(calls)

    def delta(self, text: str, final: bool) -> dict:
        """The delta fields new since the last call (cumulative `text`); {} when none."""
        reasoning, content = self._split(text, final)
        out: dict = {}
        if reasoning and len(reasoning) > self._sent_reasoning:
            out["reasoning_content"] = reasoning[self._sent_reasoning:]
            self._sent_reasoning = len(reasoning)
        if self._calls is not None:
            new, calls = self._calls.update(content, final)
            if calls:
                out["tool_calls"] = calls
        else:
            new = content[self._sent_content:]
            self._sent_content = len(content)
        if new:
            out["content"] = new
        return out

    @property
    def streamed_calls(self) -> bool:
        return self._calls is not None and self._calls.num_calls > 0

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """"stop" becomes the tool parser's finish reason ("tool_calls") when calls were made."""
        if called and reason == "stop" and self.tools is not None:
            return self.tools.finish_reason
        return reason
