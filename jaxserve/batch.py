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


class PageRows:
    """The page ids of every sequence holding pages, one persistent host row each (vLLM V1's
    BlockTable idea): the scheduler writes a sequence's pages as it allocates them, and a step's
    Batch.page_table is one gather of its rows instead of a rebuild from the Python lists (which
    took 2.7 ms a step at 1,024 sequences of ~25 pages). Entries past a row's count are 0."""

    def __init__(self, num_rows: int, num_cols: int = 64):
        self.table = np.zeros((max(num_rows, 1), num_cols), np.int32)  # i32[rows, cols]
        self.counts = np.zeros(max(num_rows, 1), np.int64)  # pages in each row
        self._row_of: dict[Sequence, int] = {}
        self._free = list(range(len(self.counts) - 1, -1, -1))

    def set(self, seq: Sequence, page_ids: list[int]) -> None:
        """Give `seq` a row holding exactly page_ids."""
        row = self._row_of.get(seq)
        if row is None:
            if not self._free:
                self._grow(rows=2 * len(self.counts))
            row = self._row_of[seq] = self._free.pop()
        self._fit(len(page_ids))
        self.table[row] = 0
        self.table[row, :len(page_ids)] = page_ids
        self.counts[row] = len(page_ids)

    def extend(self, seq: Sequence, page_ids: list[int]) -> None:
        """Append page_ids to seq's row."""
        row = self._row_of[seq]
        start = int(self.counts[row])
        self._fit(start + len(page_ids))
        self.table[row, start:start + len(page_ids)] = page_ids
        self.counts[row] = start + len(page_ids)

    def drop(self, seq: Sequence) -> None:
        row = self._row_of.pop(seq, None)
        if row is not None:
            self._free.append(row)

    def rows(self, seqs: list[Sequence]) -> np.ndarray:
        return np.fromiter(map(self._row_of.__getitem__, seqs), np.intp, len(seqs))

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """i32[B, M] the page tables of `rows` (from rows()), M = their largest page count."""
        return self.table[rows, :int(self.counts[rows].max())]

    def _fit(self, num_cols: int) -> None:
        if num_cols > self.table.shape[1]:
            self._grow(cols=max(num_cols, 2 * self.table.shape[1]))

    def _grow(self, rows: int | None = None, cols: int | None = None) -> None:
        old_rows, old_cols = self.table.shape
        table = np.zeros((rows or old_rows, cols or old_cols), np.int32)
        table[:old_rows, :old_cols] = self.table
        self.table = table
        if rows is not None:
            self.counts = np.concatenate([self.counts, np.zeros(rows - old_rows, np.int64)])
            self._free.extend(range(rows - 1, old_rows - 1, -1))
