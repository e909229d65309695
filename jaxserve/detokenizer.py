"""Incremental detokenization: new text per step, never splitting a multi-byte UTF-8 character.

Decodes a short window of recent tokens instead of the whole output each step (vLLM's prefix/read
offsets): the text of tokens[prefix:read] is already emitted; tokens[prefix:] decoded minus that gives
the new text, held back while it ends in an incomplete character (U+FFFD).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Prompt tokens decoded before the first output token, so space-merging tokenizers see context.
_CONTEXT_TOKENS = 5


@dataclass
class DetokenizerState:
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    tokens: list[int] = field(default_factory=list)
    consumed: int = 0  # output tokens fed so far
    stop_checked: int = 0  # text length already searched for stop strings


def _backend_decode(tokenizer):
    """The Rust tokenizer's decode(ids, skip_special_tokens) when `tokenizer` is a HF fast
    tokenizer whose decode adds nothing to it at clean_up_tokenization_spaces=False (transformers'
    own decode wraps it: ~9 us a call against ~2 us, twice per sequence per step with stop
    strings: 13 ms a step at 1,024 sequences, benchmarks/host_step.py); else None."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    cls = type(tokenizer)
    if (not isinstance(tokenizer, PreTrainedTokenizerFast)
            or cls._decode is not PreTrainedTokenizerFast._decode
            or cls.decode is not PreTrainedTokenizerBase.decode
            or not hasattr(getattr(tokenizer, "_tokenizer", None), "decode")):
        return None
    return tokenizer._tokenizer.decode


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_len = len(tokenizer)
        self._token_texts: dict[int, str] = {}
        self._fast_decode = _backend_decode(tokenizer)

    def _clamp(self, ids: list[int]) -> list[int]:
        """Dummy-weight models may emit ids the stand-in tokenizer lacks: fold them into range."""
        return [i if i < self.vocab_len else i % self.vocab_len for i in ids]

    def token_text(self, token_id: int) -> str:
        """One token's own text (Logprob.decoded_token), cached: logprobs ask for the same few
        thousand ids over and over."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.decode([token_id], skip_special_tokens=False)
        return text

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._decode_in_range(self._clamp(ids), skip_special_tokens)

    def _decode_in_range(self, ids: list[int], skip_special_tokens: bool) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def start(self, prompt_ids: list[int]) -> DetokenizerState:
        """Seed the window with the prompt's tail so the first output token decodes in context."""
        tail = self._clamp(prompt_ids[-_CONTEXT_TOKENS:])
        return DetokenizerState(tokens=list(tail), prefix_offset=0, read_offset=len(tail))

    def step(self, state: DetokenizerState, new_ids: list[int], skip_special_tokens: bool,
             final: bool = False) -> str:
        """Append new_ids; return the newly complete text (may be ""). `final` flushes an
        incomplete trailing character as U+FFFD instead of waiting for more tokens."""
        state.tokens.extend(self._clamp(new_ids))
        state.consumed += len(new_ids)
        # state.tokens are clamped already
        prefix_text = self._decode_in_range(state.tokens[state.prefix_offset:state.read_offset],
                                            skip_special_tokens)
        full_text = self._decode_in_range(state.tokens[state.prefix_offset:], skip_special_tokens)
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or an incomplete UTF-8 character: wait for more tokens
        new = full_text[len(prefix_text):]
        state.prefix_offset, state.read_offset = state.read_offset, len(state.tokens)
        state.text += new
        return new
