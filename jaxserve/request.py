"""Host-side request state: one Sequence per generated completion (n > 1 gives n sequences).

Plain Python and numpy only; the scheduler and the engine's output path share these objects.
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from jaxserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """One completion being generated. Identity semantics (eq=False): used as dict keys."""

    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (prefix hits included)
    page_ids: list[int] = field(default_factory=list)  # this sequence's page table
    num_cached_prompt_tokens: int = 0  # prefix-cache hits at the last admission
    # Tokens sampled on the device but not yet appended (the engine schedules step n+1 before it
    # reads step n's tokens); at most 1 when schedule() runs. last_row: this sequence's row in the
    # step that sampled that token, whose output feeds the next step's input on device.
    num_pending: int = 0
    last_row: int = -1
    sampling_seed: int = 0  # per-sequence sampler seed (set by the engine)
    lora_request: Any = None  # jaxserve.lora.LoRARequest, or None for the base model
    # Token controls (engine): token_controls.RequestControls shared by the request's sequences,
    # and this sequence's grammar matcher (structured outputs) if any.
    controls: Any = None
    matcher: Any = None
    # For n > 1: sequences with index > 0 wait until the first finished its prompt, so they find
    # its full pages in the prefix cache instead of recomputing them.
    parent: "Sequence | None" = None
    # Filled by the engine's output path (not the scheduler):
    # Per output token {token_id: Logprob}: a SampleLogprobs when the request asked (engine).
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)  # per prompt token: None | {token_id: logprob}

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def lora_int_id(self) -> int:
        """The adapter's id (0 = the base model): part of the prefix-cache page hash."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def mask_follows_tokens(self) -> bool:
        """Its next token's mask depends on the token before it (a grammar, a multi-token bad
        word): it cannot be scheduled while that token is still in flight."""
        return self.controls is not None and self.controls.dynamic

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while part of the prompt has not been computed yet."""
        return self.num_computed_tokens < self.num_prompt_tokens
