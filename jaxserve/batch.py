"""Batch: the scheduler's decision for one step, host-side numpy, unpadded (runner.py pads to buckets).

Produced by Scheduler.schedule(), consumed by ModelRunner.execute() and Scheduler.update().
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jaxserve.request import Sequence


@dataclass
class Batch:
    seqs: list[Sequence]  # B scheduled sequences; row b of every per-sequence array
    token_ids: np.ndarray  # i32[T] new tokens of all sequences, concatenated in seqs order
    # i32[T] for a token not known on the host yet (sampled by the step in flight): its row in that
    # step's sampled tokens; -1 where token_ids holds the token.
    token_src: np.ndarray
    positions: np.ndarray  # i32[T] absolute position of each new token
    slot_mapping: np.ndarray  # i32[T] page*page_size+offset for each new token's K/V
    cu_q_lens: np.ndarray  # i32[B+1] cumulative new-token counts
    kv_lens: np.ndarray  # i32[B] context length after this step (num_computed_tokens + new)
    page_table: np.ndarray  # i32[B, M] page ids, M = max pages of any scheduled seq; pad 0
    sample_mask: np.ndarray  # bool[B] True if the seq's chunk ends at its last token: it samples
    num_prefill_tokens: int  # tokens belonging to prompt chunks (for stats)
    num_decode_tokens: int
    # i32[T] LoRA device slot of each token (scheduler, from LoRASlots); NO_LORA_SLOT (and empty:
    # no LoRA engine) = the base model.
    lora_slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])
