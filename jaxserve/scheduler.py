"""Scheduler: continuous batching with chunked prefill, prefix caching and preemption by recompute.

Host side (no jax). LLMEngine.step() calls schedule() -> Batch, runs the model, then update().
Every scheduled sequence computes K/V for tokens [num_computed_tokens, num_computed_tokens + chunk):
a decode is a chunk of 1 (the last sampled token), a prefill a longer one, a recompute after
preemption re-runs prompt + outputs. A sequence samples exactly when its chunk ends at its last token.
schedule() advances num_computed_tokens at once and counts a sampled token as pending until update()
appends it, so the engine may schedule step n+1 while step n runs: a pending token is then read on
device from step n's output (Batch.token_src).
"""
from __future__ import annotations

import bisect
from collections import deque

import numpy as np

from jaxserve.batch import Batch, PageRows
from jaxserve.lora import NO_LORA_SLOT, LoRASlots
from jaxserve.pages import PageAllocator
from jaxserve.request import Sequence, Status


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _arrival_key(seq: Sequence) -> tuple[float, int]:
    return seq.arrival_time, seq.seq_id


def _token_slice(seq: Sequence, start: int, end: int) -> list[int]:
    """seq.all_token_ids[start:end] without concatenating the whole history."""
    prompt, n = seq.prompt_token_ids, seq.num_prompt_tokens
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return seq.output_token_ids[start - n:end - n]
    return prompt[start:] + seq.output_token_ids[:end - n]


def _advance_chunks(chunks: list[tuple[Sequence, int]]) -> tuple[np.ndarray, ...]:
    """_build_batch's pass over the sequences: (token_ids i32[T], token_src i32[T], sample_mask
    bool[B], starts i32[B], prompt lens i32[B]); advances each sequence past its chunk, and one
    that samples gets a pending token (its row in this step: last_row)."""
    starts, prompt_lens = [], []
    one_idx, one_ids, src_idx, src_rows, sampled = [], [], [], [], []
    token_ids = np.zeros(sum(n for _, n in chunks), dtype=np.int32)
    off = 0
    for b, (seq, num_new) in enumerate(chunks):
        start = seq.num_computed_tokens
        end = start + num_new
        num_prompt = len(seq.prompt_token_ids)
        seq_tokens = num_prompt + len(seq.output_token_ids)
        starts.append(start)
        prompt_lens.append(num_prompt)
        known = min(end, seq_tokens) - start
        if known == 1:
            one_idx.append(off)
            one_ids.append(_token_slice(seq, start, start + 1)[0])
        elif known > 0:
            token_ids[off:off + known] = _token_slice(seq, start, start + known)
        if known < num_new:  # the pending token: read from the step in flight
            assert num_new - known == 1 and seq.last_row >= 0, (seq, num_new, known)
            src_idx.append(off + known)
            src_rows.append(seq.last_row)
        seq.num_computed_tokens = end
        if end == seq_tokens + seq.num_pending:
            sampled.append(b)
            seq.num_pending += 1
            seq.last_row = b
        off += num_new
    token_ids[one_idx] = one_ids
    token_src = np.full(off, -1, dtype=np.int32)
    token_src[src_idx] = src_rows
    sample_mask = np.zeros(len(chunks), dtype=bool)
    sample_mask[sampled] = True
    return (token_ids, token_src, sample_mask, np.array(starts, np.int32),
            np.array(prompt_lens, np.int32))


class Scheduler:
    """FCFS continuous batching over a PageAllocator.

    `running` is kept sorted by arrival, so the preemption victim (the most recently arrived
    running sequence) is always `running[-1]`, and running sequences are served oldest first:
    the oldest always makes progress, hence no livelock as long as one sequence fits the pool.
    """

    def __init__(self, *, num_pages: int, page_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int,
                 enable_prefix_caching: bool = True, max_loras: int = 0):
        self.allocator = PageAllocator(num_pages, page_size, enable_prefix_caching)
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Hashes of each running sequence's full pages registered so far (the prefix-hash chain).
        self._page_hashes: dict[Sequence, list[int]] = {}
        self.page_rows = PageRows(max_num_seqs)  # a copy of each running seq's page_ids
        # LoRA device slots (max_loras > 0): running sequences pin their adapter's slot.
        self.lora_slots = LoRASlots(max_loras) if max_loras else None
        self.num_preemptions = 0  # stats, cumulative
        self.num_prefix_queried_tokens = 0
        self.num_prefix_hit_tokens = 0

    # ---- queue management -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (FCFS). Request validation is the engine's job; these asserts
        only guard liveness: alone in the pool, every sequence must fit, or preempting all the
        others would not let it progress."""
        assert seq.status is Status.WAITING and not seq.page_ids, "add() takes a fresh sequence"
        assert seq.num_tokens <= self.max_model_len, (
            f"prompt of {seq.num_tokens} tokens exceeds {self.max_model_len=}")
        assert _cdiv(self._max_kv_len(seq), self.page_size) <= self.allocator.num_pages, (
            f"a sequence of up to {self._max_kv_len(seq)} tokens does not fit the page pool")
        self.waiting.append(seq)

    def _max_kv_len(self, seq: Sequence) -> int:
        """Most K/V slots `seq` can ever hold: its last sampled token finishes it uncomputed."""
        max_tokens = seq.params.max_tokens or self.max_model_len
        return min(seq.num_tokens + max_tokens - 1, max(self.max_model_len - 1, seq.num_tokens))

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence now (stop string, abort): frees its pages. No-op if already finished."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of `request_id` with reason "abort"; returns them."""
        seqs = [s for s in [*self.running, *self.waiting] if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.allocator.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Fraction of tokens looked up at admission that were found in the prefix cache."""
        return self.num_prefix_hit_tokens / max(self.num_prefix_queried_tokens, 1)

    # ---- schedule ---------------------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """Pick this step's sequences and chunk lengths; None when nothing can run."""
        budget = self.max_num_batched_tokens
        chunks: list[tuple[Sequence, int]] = []
        preempted = self._schedule_running(chunks, budget)
        budget -= sum(n for _, n in chunks)
        # Admitting right after a preemption would just take back the pages we freed.
        if not preempted:
            self._schedule_waiting(chunks, budget)
        return self._build_batch(chunks) if chunks else None

    def _schedule_running(self, chunks: list[tuple[Sequence, int]], budget: int) -> bool:
        """Give running sequences (oldest first) their next chunk; returns whether any was preempted.
        (Sequence properties and _grow_pages' no-op case are inlined: this loop runs once per
        running sequence per step, 1,024 of them at vLLM's offline default.)"""
        preempted = False
        ps, max_model_len, running = self.page_size, self.max_model_len, self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_out = len(seq.output_token_ids)
            num_tokens = len(seq.prompt_token_ids) + num_out
            pending = seq.num_pending
            num_new = min(num_tokens + pending - seq.num_computed_tokens, budget)
            # Skipped as well: a sequence whose token in flight is certain to finish it
            # (max_tokens or max_model_len), as scheduling it again would compute a token that
            # update() throws away.
            if num_new <= 0 or (pending and (
                    num_out + pending >= (seq.params.max_tokens or max_model_len)
                    or num_tokens + pending >= max_model_len)):
                i += 1
                continue
            if seq.num_computed_tokens + num_new > len(seq.page_ids) * ps:
                while not self._grow_pages(seq, seq.num_computed_tokens + num_new):
                    victim = running[-1]  # index >= i: never a sequence already in `chunks`
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        return preempted
            chunks.append((seq, num_new))
            budget -= num_new
            i += 1
        return preempted

    def _schedule_waiting(self, chunks: list[tuple[Sequence, int]], budget: int) -> None:
        """Admit waiting sequences FCFS while seats, tokens and pages allow."""
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if seq.num_pending or self._waits_for_parent(seq):
                i += 1  # n > 1 siblings let later requests pass while the first one prefills
                continue
            if seq.lora_int_id and not self.lora_slots.can_acquire(seq.lora_int_id):
                i += 1  # every LoRA slot is pinned by other adapters: it waits, others pass
                continue
            num_new = self._admit(seq, budget)
            if num_new == 0:
                return  # head of line does not fit: FCFS, nobody overtakes it
            del self.waiting[i]
            chunks.append((seq, num_new))
            budget -= num_new

    def _waits_for_parent(self, seq: Sequence) -> bool:
        parent = seq.parent
        if parent is None or not self.enable_prefix_caching:
            return False
        # Its prompt pages are in the prefix cache once update() has applied the step that
        # finished the prompt, which is also the step that gave it its first output token
        # (num_computed_tokens alone runs ahead: schedule() advances it before the step runs).
        return not parent.is_finished and not parent.output_token_ids

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Move `seq` to running with prefix hits and pages for its first chunk; 0 if it does not fit."""
        ps, alloc = self.page_size, self.allocator
        # Prompt logprobs need logits at every prompt position, so skip the cache until they exist.
        wants_prompt_logprobs = (seq.params.prompt_logprobs is not None and seq.parent is None
                                 and not seq.output_token_ids)
        hits = [] if wants_prompt_logprobs else alloc.match_prefix(seq.all_token_ids,
                                                                        seq.lora_int_id)
        num_cached = len(hits) * ps
        num_new = min(seq.num_tokens - num_cached, budget)
        num_needed = _cdiv(num_cached + num_new, ps) - len(hits)
        num_revived = sum(1 for p in hits if alloc.ref_count(p) == 0)  # leave the evictable set
        if num_needed + num_revived > alloc.num_free_pages:
            return 0
        alloc.acquire(hits)  # before allocate(), so eviction cannot take our hits
        seq.page_ids = hits + alloc.allocate(num_needed)
        self.page_rows.set(seq, seq.page_ids)
        seq.num_computed_tokens = num_cached
        seq.num_cached_prompt_tokens = min(num_cached, seq.num_prompt_tokens)
        seq.status = Status.RUNNING
        if seq.lora_request is not None:
            self.lora_slots.acquire(seq.lora_request)
        self._page_hashes[seq] = [alloc.page_hash(p) for p in hits]
        self.num_prefix_queried_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += num_cached
        bisect.insort(self.running, seq, key=_arrival_key)
        return num_new

    def _grow_pages(self, seq: Sequence, num_kv_tokens: int) -> bool:
        """Make seq.page_ids cover `num_kv_tokens` slots; False if the pool is short."""
        num_needed = _cdiv(num_kv_tokens, self.page_size) - len(seq.page_ids)
        if num_needed <= 0:
            return True
        if not self.allocator.can_allocate(num_needed):
            return False
        new = self.allocator.allocate(num_needed)
        self.page_rows.extend(seq, new)
        seq.page_ids.extend(new)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: free the pages (cached ones stay cached), back to the FRONT of waiting."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        if seq.lora_request is not None and seq.status is Status.RUNNING:
            self.lora_slots.release(seq.lora_int_id)
        self.allocator.free(seq.page_ids)
        self.page_rows.drop(seq)
        seq.page_ids = []
        seq.num_computed_tokens = 0
        self._page_hashes.pop(seq, None)

    def _build_batch(self, chunks: list[tuple[Sequence, int]]) -> Batch:
        """Flatten (seq, chunk length) pairs into the Batch arrays (see batch.py for the fields),
        then advance each sequence past its chunk (its sampled token becomes pending). One Python
        pass over the sequences (_advance_chunks); the page table is a gather of their PageRows."""
        ps, num_seqs = self.page_size, len(chunks)
        seqs = [seq for seq, _ in chunks]
        lens = np.fromiter((n for _, n in chunks), np.int32, num_seqs)
        token_ids, token_src, sample_mask, starts, prompt_lens = _advance_chunks(chunks)
        num_tokens = len(token_ids)
        cu_q_lens = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(lens, out=cu_q_lens[1:])
        page_table = self.page_rows.gather(self.page_rows.rows(seqs))
        positions = np.arange(num_tokens, dtype=np.int32) - np.repeat(cu_q_lens[:-1] - starts, lens)
        rows = np.repeat(np.arange(num_seqs), lens)
        slot_mapping = page_table[rows, positions // ps] * ps + positions % ps
        num_decode = int(np.count_nonzero((lens == 1) & (starts >= prompt_lens)))
        return Batch(
            seqs=seqs, token_ids=token_ids, token_src=token_src,
            positions=positions, slot_mapping=slot_mapping.astype(np.int32), cu_q_lens=cu_q_lens,
            kv_lens=starts + lens, page_table=page_table, sample_mask=sample_mask,
            num_prefill_tokens=num_tokens - num_decode, num_decode_tokens=num_decode,
            lora_slots=self._lora_slots_of(chunks, lens))

    def _lora_slots_of(self, chunks: list[tuple[Sequence, int]], lens: np.ndarray) -> np.ndarray:
        """i32[T] each token's LoRA device slot (NO_LORA_SLOT: base model); empty without LoRA."""
        if self.lora_slots is None:
            return np.zeros(0, np.int32)
        slots = [NO_LORA_SLOT if seq.lora_request is None else
                 self.lora_slots.slot_of(seq.lora_int_id) for seq, _ in chunks]
        return np.repeat(np.asarray(slots, np.int32), lens)

    # ---- update -----------------------------------------------------------------------------
    def update(self, batch: Batch, sampled_token_ids: np.ndarray) -> list[Sequence]:
        """Apply one executed step. `sampled_token_ids`: i32[B], read only where sample_mask.

        Returns the sequences that got a new token or finished, in batch order. Finished ones
        have status FINISHED, finish_reason/stop_reason set, and their pages already freed.
        """
        out = []
        tokens = np.asarray(sampled_token_ids).tolist()  # Python ints: no per-row numpy scalar
        ps, caching, finished = self.page_size, self.enable_prefix_caching, Status.FINISHED
        for b, sampled in enumerate(batch.sample_mask.tolist()):
            seq = batch.seqs[b]
            if seq.status is finished:  # finished (abort, stop string, stop one step ago) while it ran
                continue
            if sampled:
                seq.num_pending -= 1
                seq.output_token_ids.append(tokens[b])
            if caching:
                hashes = self._page_hashes.get(seq)
                if hashes is not None and len(hashes) < min(
                        seq.num_computed_tokens,
                        len(seq.prompt_token_ids) + len(seq.output_token_ids)) // ps:
                    self._register_full_pages(seq)
            if not sampled:
                continue
            stop = self._check_stop(seq)
            if stop is not None:
                self.finish(seq, *stop)
            out.append(seq)
        return out

    def _register_full_pages(self, seq: Sequence) -> None:
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        hashes = self._page_hashes.get(seq)
        if hashes is None:  # preempted since it was scheduled: its pages are gone
            return
        for i in range(len(hashes), min(seq.num_computed_tokens, seq.num_tokens) // ps):
            parent = hashes[-1] if hashes else None
            tokens = _token_slice(seq, i * ps, (i + 1) * ps)
            hashes.append(self.allocator.register_full_page(seq.page_ids[i], parent, tokens,
                                                            seq.lora_int_id))

    def _check_stop(self, seq: Sequence) -> tuple[str, int | None] | None:
        """(finish_reason, stop_reason) if the token just appended ends `seq`, else None."""
        params, out = seq.params, seq.output_token_ids
        token, num_out = out[-1], len(out)
        if num_out >= params.min_tokens:
            if params.stop_token_ids and token in params.stop_token_ids:
                return "stop", token
            if not params.ignore_eos and token in seq.eos_token_ids:
                return "stop", None  # vLLM: EOS is not a stop_reason
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return "length", None
        if len(seq.prompt_token_ids) + num_out >= self.max_model_len:
            return "length", None
        return None
