"""SamplingInputs: the host side of the sampler's per-step inputs (numpy, plus the device arrays it
keeps): SamplingMetadata's per-row columns, the token controls padded to the batch, and the rows of
the penalty token history (i32[max_num_seqs rows, max_model_len] on device; each step writes its
input tokens there, so the history follows async scheduling, preemption and recompute; rows are
assigned here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.batch import Batch
from jaxserve.logits_processors import write_prefix
from jaxserve.sampler import SamplingMetadata
from jaxserve.sampling_params import MAX_LOGIT_BIAS
from jaxserve.token_controls import TokenInputs, num_words


def pow2_at_least(n: int, smallest: int = 1) -> int:
    size = smallest
    while size < n:
        size *= 2
    return size


def pad_to(a: np.ndarray, size: int, value) -> np.ndarray:
    """i32[size]: a, then `value`."""
    out = np.full(size, value, np.int32)
    out[:len(a)] = a
    return out


@dataclass
class PenaltyInputs:
    """Where a penalty step reads and writes the token history (host-built, padded)."""

    token_slot: np.ndarray  # i32[T] history row of each new token; pad (no penalties) = num rows
    row_slot: np.ndarray  # i32[B] history row of each sequence; pad (no penalties) = num rows


jax.tree_util.register_dataclass(PenaltyInputs, data_fields=["token_slot", "row_slot"],
                                 meta_fields=[])


class SamplingInputs:
    """Builds a step's SamplingMetadata and PenaltyInputs; owns the penalty history."""

    def __init__(self, *, vocab_size: int, max_num_seqs: int, max_model_len: int,
                 max_logprobs: int, mesh_context: Callable):
        self.vocab_size, self.max_logprobs = vocab_size, max_logprobs
        self.max_model_len = max_model_len
        self._mesh_context = mesh_context
        # Penalty token history (allocated at the first penalty step) and its host bookkeeping.
        self.num_history_rows = max_num_seqs
        self.history = None  # i32[num_history_rows, max_model_len]
        self._row_of: dict[int, tuple[Any, int]] = {}  # seq_id -> (Sequence, history row)
        self._free_rows = list(range(self.num_history_rows - 1, -1, -1))
        self._write_prefix = jax.jit(write_prefix, donate_argnames=("history",))
        self._neutral_tokens: dict[int, tuple] = {}  # b_pad -> no-op token controls (device)

    def metadata(self, batch: Batch, b_pad: int, full: bool,
                           tokens: TokenInputs) -> SamplingMetadata:
        """Two sampler variants only: plain (greedy, temperature) and full (penalties, top-k/p,
        min-p, max_logprobs logprobs, token masks and logit bias; no-ops for rows that do not ask).
        A static flag per setting compiled every token bucket mid-run when a setting first
        appeared (seconds each)."""
        seqs = batch.seqs
        B = len(seqs)

        def col(fn, dtype, pad):
            a = np.full(b_pad, pad, dtype)
            a[:B] = [fn(s) for s in seqs]
            return a

        params = [s.params for s in seqs]
        full = full or any(
            p.uses_penalties or p.logprobs is not None
            or (not p.greedy and (0 < p.top_k < self.vocab_size or p.top_p < 1.0 or p.min_p > 0))
            for p in params) or tokens.mask is not None or tokens.bias_ids is not None
        mask, bias_ids, bias_values = self._token_arrays(tokens, b_pad, full)
        return SamplingMetadata(
            temperature=col(lambda s: s.params.temperature, np.float32, 0.0),
            top_k=col(lambda s: s.params.top_k, np.int32, 0),
            top_p=col(lambda s: s.params.top_p, np.float32, 1.0),
            min_p=col(lambda s: s.params.min_p, np.float32, 0.0),
            seeds=col(lambda s: s.sampling_seed, np.uint32, 0),
            counters=pad_to(batch.kv_lens, b_pad, 0),  # position of the sampled token: batch-free
            presence_penalty=col(lambda s: s.params.presence_penalty, np.float32, 0.0),
            frequency_penalty=col(lambda s: s.params.frequency_penalty, np.float32, 0.0),
            repetition_penalty=col(lambda s: s.params.repetition_penalty, np.float32, 1.0),
            token_mask=mask, bias_ids=bias_ids, bias_values=bias_values,
            history_ids=np.zeros((b_pad, 0), np.int32),
            want_logprobs=col(lambda s: s.params.logprobs is not None, bool, False),
            prompt_lens=col(lambda s: s.num_prompt_tokens, np.int32, 0),
            use_penalties=full, use_top_k=full, use_top_p=full, use_min_p=full,
            num_logprobs=self.max_logprobs if full else -1)

    def _token_arrays(self, tokens: TokenInputs, b_pad: int, full: bool) -> tuple:
        """(mask i32[b_pad, W], bias ids, bias values) padded; [b_pad, 0] in the plain variant.
        A full step without controls gets device-resident neutral arrays (nothing copied)."""
        if not full:
            empty = np.zeros((b_pad, 0), np.int32)
            return empty, empty, empty.astype(np.float32)
        if b_pad not in self._neutral_tokens:
            with self._mesh_context():
                self._neutral_tokens[b_pad] = (
                    jnp.full((b_pad, num_words(self.vocab_size)), -1, jnp.int32),
                    jnp.full((b_pad, MAX_LOGIT_BIAS), self.vocab_size, jnp.int32),
                    jnp.zeros((b_pad, MAX_LOGIT_BIAS), jnp.float32))
        mask, ids, values = self._neutral_tokens[b_pad]
        # A step's own controls go to the device as arrays of the neutral ones' shape and
        # sharding, not packed with the host inputs: the step's input layout (its PackSpec, so its
        # executable) stays the full variant's, which warm-up compiled. Packed, every bucket
        # compiled again mid-run at the first masked step (measured: 4 compiles, ~14 s, inside a
        # timed structured-output run on the H200).
        if tokens.mask is not None:
            host = np.full(mask.shape, -1, np.int32)
            host[:len(tokens.mask)] = tokens.mask
            mask = jax.device_put(host, mask.sharding)
        if tokens.bias_ids is not None:
            host_ids = np.full(ids.shape, self.vocab_size, np.int32)
            host_values = np.zeros(values.shape, np.float32)
            host_ids[:len(tokens.bias_ids)], host_values[:len(tokens.bias_ids)] = \
                tokens.bias_ids, tokens.bias_values
            ids, values = jax.device_put((host_ids, host_values), (ids.sharding, values.sharding))
        return mask, ids, values

    def penalty_inputs(self, batch: Batch, t_pad: int, b_pad: int) -> PenaltyInputs:
        """History rows of the batch's penalty sequences; a sequence new to its row gets the tokens
        before its first chunk written now (dispatched ahead of the step)."""
        if self.history is None:
            with self._mesh_context():
                self.history = jnp.zeros((self.num_history_rows, self.max_model_len), jnp.int32)
        none = self.num_history_rows
        row_slot = np.full(b_pad, none, np.int32)
        in_batch = {s.seq_id for s in batch.seqs}
        prefixes = []
        for b, seq in enumerate(batch.seqs):
            if not seq.params.uses_penalties:
                continue
            entry = self._row_of.get(seq.seq_id)
            if entry is None:
                entry = self._row_of[seq.seq_id] = (seq, self._take_row(in_batch))
                start = int(batch.positions[batch.cu_q_lens[b]])
                if start > 0:
                    prefixes.append((entry[1], seq.all_token_ids[:start]))
            row_slot[b] = entry[1]
        if prefixes:
            self._write_prefixes(prefixes, b_pad)
        lens = np.diff(batch.cu_q_lens)
        token_slot = pad_to(np.repeat(row_slot[:batch.num_seqs], lens), t_pad, none)
        return PenaltyInputs(token_slot=token_slot, row_slot=row_slot)

    def _take_row(self, in_batch: set[int]) -> int:
        """A free history row: else one of a finished sequence, else of one not in this batch
        (it gets a row and its prefix again when it next runs)."""
        if not self._free_rows:
            for seq_id, (seq, row) in list(self._row_of.items()):
                if seq.is_finished:
                    self._free_rows.append(self._row_of.pop(seq_id)[1])
        if not self._free_rows:
            seq_id = next(i for i in self._row_of if i not in in_batch)
            self._free_rows.append(self._row_of.pop(seq_id)[1])
        return self._free_rows.pop()

    def _write_prefixes(self, prefixes: list[tuple[int, list[int]]], b_pad: int) -> None:
        width = pow2_at_least(max(len(ids) for _, ids in prefixes), 16)
        slots = np.full(b_pad, self.num_history_rows, np.int32)
        ids = np.full((b_pad, width), self.vocab_size, np.int32)
        for i, (row, tokens) in enumerate(prefixes):
            slots[i] = row
            ids[i, :len(tokens)] = tokens
        with self._mesh_context():
            self.history = self._write_prefix(self.history, slots, ids)
