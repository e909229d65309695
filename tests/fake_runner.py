"""Test double for ModelRunner: a KV "cache" of (token, position) per slot and a pure next-token rule.

Used by the scheduler tests. It checks the Batch contract the real runner relies on: the tokens
it writes are the sequence's tokens, writes only hit pages the sequence owns alone, and every
context it reads back through page_table/kv_lens holds exactly the sequence's history.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from jaxserve.batch import Batch
from jaxserve.pages import PageAllocator
from jaxserve.request import Sequence
from jaxserve.sampling_params import SamplingParams

VOCAB = 1000
EOS = VOCAB - 1  # never produced by reference_next_token


def reference_next_token(history: list[int], salt: int) -> int:
    """The fake model: a pure function of the token history (and the completion index)."""
    data = np.asarray(history, dtype=np.int64).tobytes() + salt.to_bytes(4, "little")
    return zlib.crc32(data) % (VOCAB - 1)


def reference_generate(prompt: list[int], salt: int, max_tokens: int, max_model_len: int) -> list[int]:
    """No-cache oracle: what the scheduler + fake runner must produce (no stop tokens involved)."""
    history = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        token = reference_next_token(history, salt)
        out.append(token)
        history.append(token)
        if len(history) >= max_model_len:
            break
    return out


TokenFn = Callable[[Sequence, list[int]], int]


class FakeRunner:
    """Executes a Batch against a simulated paged KV cache; returns i32[B] sampled tokens."""

    def __init__(self, allocator: PageAllocator, token_fn: TokenFn | None = None):
        num_slots = allocator.num_pages * allocator.page_size
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.kv_token = np.full(num_slots, -1, dtype=np.int64)
        self.kv_pos = np.full(num_slots, -1, dtype=np.int64)
        self.token_fn = token_fn or (lambda seq, history: reference_next_token(history, seq.index))
        self.num_computed = 0  # total tokens whose K/V were written

    def execute(self, batch: Batch) -> np.ndarray:
        self._check_writes(batch)
        self.kv_token[batch.slot_mapping] = batch.token_ids
        self.kv_pos[batch.slot_mapping] = batch.positions
        self.num_computed += batch.num_tokens
        out = np.zeros(batch.num_seqs, dtype=np.int32)
        for b, seq in enumerate(batch.seqs):
            if batch.sample_mask[b]:
                out[b] = self.token_fn(seq, self._read_context(batch, b))
        return out

    def _check_writes(self, batch: Batch) -> None:
        assert len({id(s) for s in batch.seqs}) == batch.num_seqs, "sequence scheduled twice"
        assert len(set(batch.slot_mapping.tolist())) == batch.num_tokens, "slot written twice"
        for b, seq in enumerate(batch.seqs):
            lo, hi = batch.cu_q_lens[b], batch.cu_q_lens[b + 1]
            positions = batch.positions[lo:hi]
            # schedule() has already advanced num_computed_tokens past this chunk.
            assert hi > lo and positions[-1] == seq.num_computed_tokens - 1
            assert batch.kv_lens[b] == positions[-1] + 1
            assert batch.sample_mask[b] == (batch.kv_lens[b] == seq.num_tokens)
            history = seq.all_token_ids
            assert batch.token_ids[lo:hi].tolist() == [history[p] for p in positions]
            for page in set((batch.slot_mapping[lo:hi] // self.page_size).tolist()):
                assert page in seq.page_ids, f"write to page {page} not owned by the sequence"
                assert self.allocator.ref_count(page) == 1, f"write to shared page {page}"

    def _read_context(self, batch: Batch, b: int) -> list[int]:
        kv_len = int(batch.kv_lens[b])
        pos = np.arange(kv_len)
        slots = batch.page_table[b, pos // self.page_size] * self.page_size + pos % self.page_size
        assert (self.kv_pos[slots] == pos).all(), f"stale K/V read for {batch.seqs[b].request_id}"
        return self.kv_token[slots].tolist()


def make_request(request_id: str, prompt: list[int], n: int = 1, **params) -> list[Sequence]:
    """The n sequences of one request, siblings pointing at the first (as the engine does)."""
    sampling = SamplingParams(n=n, **params)
    first = Sequence(request_id, 0, list(prompt), sampling, eos_token_ids=frozenset({EOS}))
    rest = [Sequence(request_id, i, list(prompt), sampling, eos_token_ids=frozenset({EOS}),
                     parent=first) for i in range(1, n)]
    return [first, *rest]


def check_batch_limits(batch: Batch, max_num_seqs: int, max_num_batched_tokens: int) -> None:
    assert batch.num_seqs <= max_num_seqs
    assert batch.num_tokens <= max_num_batched_tokens
    assert batch.num_prefill_tokens + batch.num_decode_tokens == batch.num_tokens
    assert batch.page_table.shape == (batch.num_seqs, max(len(s.page_ids) for s in batch.seqs))
