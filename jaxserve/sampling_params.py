"""SamplingParams: what a request asks of the sampler and of the stop checks (vLLM's names)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


@dataclass(kw_only=True)
class StructuredOutputsParams:
    """One output constraint (vLLM's names); jaxserve.structured_outputs compiles it to a token
    mask. Exactly one of json, regex, choice, grammar, json_object may be set."""

    json: str | dict | None = None  # a JSON Schema (dict or its JSON text)
    regex: str | None = None  # Rust `regex` syntax, matched in full
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # a Lark grammar or a GBNF (llama.cpp) one
    json_object: bool | None = None  # any JSON object
    disable_fallback: bool = False  # accepted: there is one backend (llguidance), no fallback
    disable_any_whitespace: bool = False  # JSON: no whitespace between tokens
    disable_additional_properties: bool = False  # JSON: additionalProperties false by default
    whitespace_pattern: str | None = None  # JSON: the regex whitespace must match
    structural_tag: str | None = None  # vLLM's; not implemented (refused)

    KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    def __post_init__(self):
        given = [k for k in self.KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of "
                             f"{', '.join(self.KINDS)}; got {given or 'none'}")
        if self.structural_tag is not None:
            raise ValueError(f"structured_outputs.structural_tag is not implemented yet, got "
                             f"{self.structural_tag=}")
        checks = {
            "json": isinstance(self.json, (str, dict)),
            "regex": isinstance(self.regex, str),
            "choice": isinstance(self.choice, list) and bool(self.choice)
            and all(isinstance(c, str) for c in self.choice),
            "grammar": isinstance(self.grammar, str) and bool(self.grammar.strip()),
            "json_object": self.json_object is True,
        }
        kind = given[0]
        if not checks[kind]:
            value = getattr(self, kind)
            raise ValueError(f"structured_outputs.{kind} is not valid: {kind}={value!r:.200}")

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in self.KINDS if getattr(self, k) is not None)


MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit); the sampler's fixed width


def _is_token_id(t) -> bool:
    return ((isinstance(t, int) and not isinstance(t, bool)) or type(t).__name__.startswith("int")) \
        and t >= 0


class RequestOutputKind(enum.Enum):
    """What step() reports for a request (vLLM's names): the text so far, only what is new since
    the previous output, or only the end."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass(kw_only=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per output token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must match
    logit_bias: dict[int, float] | None = None  # added to the logits before penalties and sampling
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # words never generated (vLLM's tokenization rules)
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self):
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_strings = tuple(self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self):
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n must be an int >= 1, got {self.n=}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature=}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p=}"),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             f"top_k must be -1, 0 or a positive int, got {self.top_k=}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p=}"),
            (-2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty=}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty=}"),
            (self.repetition_penalty > 0.0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty=}"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             f"max_tokens must be an int >= 1, got {self.max_tokens=}"),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0,
             f"min_tokens must be an int >= 0, got {self.min_tokens=}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens must be <= max_tokens, got {self.min_tokens=}, {self.max_tokens=}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= -1),
             f"logprobs must be an int >= 0 or -1 (the whole vocabulary), got {self.logprobs=}"),
            (self.prompt_logprobs is None
             or (isinstance(self.prompt_logprobs, int) and self.prompt_logprobs >= 0),
             f"prompt_logprobs must be an int >= 0, got {self.prompt_logprobs=}"),
            (all(isinstance(s, str) and s for s in self.stop_strings),
             f"stop must be non-empty strings, got {self.stop=}"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             f"stop_token_ids must be ints >= 0, got {self.stop_token_ids=}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an int, got {self.seed=}"),
        ]
        checks.append((self.structured_outputs is None
                       or isinstance(self.structured_outputs, StructuredOutputsParams),
                       "structured_outputs must be a StructuredOutputsParams, got "
                       f"{type(self.structured_outputs).__name__}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._validate_token_controls()

    def _validate_token_controls(self):
        """Types and sizes here; token ids against the vocabulary in InputProcessor.check_params."""
        if self.logit_bias is not None:
            ok = isinstance(self.logit_bias, dict) and all(
                _is_token_id(t) and isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) for t, v in self.logit_bias.items())
            if not ok:
                raise ValueError("logit_bias must map token ids (ints >= 0) to finite numbers, got "
                                 f"logit_bias={self.logit_bias!r:.200}")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most "
                                 f"{MAX_LOGIT_BIAS} are accepted")
            self.logit_bias = {int(t): float(v) for t, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            if (not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids
                    or not all(_is_token_id(t) for t in self.allowed_token_ids)):
                raise ValueError("allowed_token_ids must be a non-empty list of token ids (ints "
                                 f">= 0), got allowed_token_ids={self.allowed_token_ids!r:.200}")
            self.allowed_token_ids = [int(t) for t in self.allowed_token_ids]
        if self.bad_words is not None:
            if (not isinstance(self.bad_words, (list, tuple))
                    or not all(isinstance(w, str) and w.strip() for w in self.bad_words)):
                raise ValueError("bad_words must be a list of non-empty strings, got "
                                 f"bad_words={self.bad_words!r:.200}")
            self.bad_words = list(self.bad_words)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
