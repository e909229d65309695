"""ModelRunner: host Batch -> padded device arrays -> one jitted step (model + sampler) -> numpy tokens.

Owns the jit, the shape buckets and the KV cache. Token counts and page-table widths are bucketed to
powers of two (the sequence rows follow the token bucket), so a steady state never recompiles: there
are at most log2(max tokens) x log2(max pages) step shapes. Every new compile is logged and counted.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.batch import Batch
from jaxserve.kv_cache import AttentionMetadata, KVCache
from jaxserve.sampler import SamplerOutput, SamplingMetadata, sample

logger = logging.getLogger(__name__)


def token_buckets(max_num_batched_tokens: int, smallest: int = 8) -> tuple[int, ...]:
    """Powers of two from `smallest`, the last one covering max_num_batched_tokens."""
    buckets = [smallest]
    while buckets[-1] < max_num_batched_tokens:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def _pow2_at_least(n: int, smallest: int = 1) -> int:
    size = smallest
    while size < n:
        size *= 2
    return size


@dataclass
class StepOutput:
    """Host copies of one step's results; row b = batch.seqs[b]."""

    token_ids: np.ndarray  # i32[B]
    logprobs: np.ndarray  # f32[B] logprob of the sampled token
    top_ids: np.ndarray  # i32[B, k]
    top_logprobs: np.ndarray  # f32[B, k]
    # Only when some sequence asked for prompt_logprobs (else None): row t = new token t of the batch.
    prompt_logprobs: np.ndarray | None = None  # f32[T] logprob of the token after token t
    prompt_top_ids: np.ndarray | None = None  # i32[T, k]
    prompt_top_logprobs: np.ndarray | None = None  # f32[T, k]


def _step(graphdef, state, kv_cache: KVCache, token_ids, logits_idx, next_ids, md: AttentionMetadata,
          smd: SamplingMetadata, prompt_logprobs_k: int):
    """The jitted step. Returns (SamplerOutput, prompt logprob triple or None, new KVCache)."""
    model = nnx.merge(graphdef, state)
    hidden, kv_cache = model(token_ids, md, kv_cache)
    logits = model.compute_logits(hidden[logits_idx])
    out = sample(logits, smd)
    prompt = None
    if prompt_logprobs_k >= 0:
        with jax.named_scope("prompt_logprobs"):
            all_logprobs = jax.nn.log_softmax(model.compute_logits(hidden).astype(jnp.float32), -1)
            nxt = jnp.take_along_axis(all_logprobs, next_ids[:, None], axis=-1)[:, 0]
            top_lp, top_ids = jax.lax.top_k(all_logprobs, prompt_logprobs_k)
            prompt = (nxt, top_ids.astype(jnp.int32), top_lp)
    return out, prompt, kv_cache


class ModelRunner:
    """Holds the model state and KV cache; `execute(batch)` runs one step."""

    def __init__(self, graphdef, state, kv_cache: KVCache, *, vocab_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, attention_impl: str,
                 mesh=None, max_logprobs: int = 20):
        self.graphdef, self.state, self.kv_cache = graphdef, state, kv_cache
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.buckets = token_buckets(max(max_num_batched_tokens, max_num_seqs))
        self.max_pages_per_seq = -(-max_model_len // kv_cache.page_size)
        self.attention_impl = attention_impl
        self.mesh = mesh
        self.max_logprobs = max_logprobs
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self._seen_shapes: set[tuple] = set()
        self._step = jax.jit(_step, static_argnames=("graphdef", "prompt_logprobs_k"),
                             donate_argnames=("kv_cache",))

    # ---- padding -------------------------------------------------------------------------------
    def bucket_for(self, num_tokens: int) -> int:
        for size in self.buckets:
            if size >= num_tokens:
                return size
        raise ValueError(f"{num_tokens=} exceeds the largest token bucket {self.buckets[-1]}")

    def _attention_metadata(self, batch: Batch, t_pad: int, b_pad: int) -> tuple[dict, np.ndarray]:
        """Host numpy arrays for AttentionMetadata, padded to (t_pad, b_pad)."""
        num_slots = self.kv_cache.num_slots
        T, B = batch.num_tokens, batch.num_seqs
        positions = np.zeros(t_pad, np.int32)
        positions[:T] = batch.positions
        slots = np.full(t_pad, num_slots, np.int32)
        slots[:T] = batch.slot_mapping
        width = min(_pow2_at_least(batch.page_table.shape[1], 8), self.max_pages_per_seq)
        page_table = np.zeros((b_pad, max(width, batch.page_table.shape[1])), np.int32)
        page_table[:B, :batch.page_table.shape[1]] = batch.page_table
        kv_lens = np.zeros(b_pad, np.int32)
        kv_lens[:B] = batch.kv_lens
        cu = np.full(b_pad + 1, batch.cu_q_lens[-1], np.int32)
        cu[:B + 1] = batch.cu_q_lens
        logits_idx = np.zeros(b_pad, np.int32)
        logits_idx[:B] = batch.cu_q_lens[1:] - 1
        arrays = dict(positions=positions, slot_mapping=slots, page_table=page_table,
                      kv_lens=kv_lens, cu_q_lens=cu, num_seqs=np.array([B], np.int32))
        return arrays, logits_idx

    def _sampling_metadata(self, batch: Batch, b_pad: int) -> SamplingMetadata:
        seqs = batch.seqs
        B = len(seqs)

        def col(fn, dtype, pad):
            a = np.full(b_pad, pad, dtype)
            a[:B] = [fn(s) for s in seqs]
            return a

        params = [s.params for s in seqs]
        use_pen = any(p.uses_penalties for p in params)
        use_tkp = any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params if not p.greedy)
        num_lp = min(self.max_logprobs, max([p.logprobs or 0 for p in params], default=0))
        banned = [sorted(s.eos_token_ids | set(s.params.stop_token_ids))
                  if len(s.output_token_ids) < s.params.min_tokens else [] for s in seqs]
        banned_arr = np.full((b_pad, _pow2_at_least(max(map(len, banned), default=1))),
                             self.vocab_size, np.int32)
        for b, ids in enumerate(banned):
            banned_arr[b, :len(ids)] = ids
        prompt_ids = self._id_matrix([s.prompt_token_ids for s in seqs] if use_pen else [], b_pad)
        output_ids = self._id_matrix([s.output_token_ids for s in seqs] if use_pen else [], b_pad)
        return SamplingMetadata(
            temperature=col(lambda s: s.params.temperature, np.float32, 0.0),
            top_k=col(lambda s: s.params.top_k, np.int32, 0),
            top_p=col(lambda s: s.params.top_p, np.float32, 1.0),
            min_p=col(lambda s: s.params.min_p, np.float32, 0.0),
            seeds=col(lambda s: s.sampling_seed, np.uint32, 0),
            counters=col(lambda s: s.num_tokens, np.int32, 0),
            presence_penalty=col(lambda s: s.params.presence_penalty, np.float32, 0.0),
            frequency_penalty=col(lambda s: s.params.frequency_penalty, np.float32, 0.0),
            repetition_penalty=col(lambda s: s.params.repetition_penalty, np.float32, 1.0),
            banned_ids=banned_arr, prompt_ids=prompt_ids, output_ids=output_ids,
            use_penalties=use_pen, use_top_k_p=use_tkp, num_logprobs=num_lp)

    def _id_matrix(self, rows: list[list[int]], b_pad: int) -> np.ndarray:
        width = _pow2_at_least(max(map(len, rows), default=0), 16) if rows else 0
        out = np.full((b_pad, width), self.vocab_size, np.int32)
        for b, ids in enumerate(rows):
            out[b, :len(ids)] = ids
        return out

    def _prompt_inputs(self, batch: Batch, t_pad: int) -> tuple[int, np.ndarray]:
        """(-1 if no prompt logprobs wanted else k, i32[t_pad] next prompt token of each token)."""
        wanted = [s.params.prompt_logprobs for s in batch.seqs
                  if s.params.prompt_logprobs is not None and s.in_prefill]
        next_ids = np.zeros(t_pad, np.int32)
        if not wanted:
            return -1, next_ids
        for b, seq in enumerate(batch.seqs):
            start, end = batch.cu_q_lens[b], batch.cu_q_lens[b + 1]
            pos = batch.positions[start:end] + 1
            ids = seq.all_token_ids
            next_ids[start:end] = [ids[p] if p < len(ids) else 0 for p in pos]
        return min(self.max_logprobs, max(wanted)), next_ids

    # ---- execution -----------------------------------------------------------------------------
    def execute(self, batch: Batch) -> StepOutput:
        t_pad = self.bucket_for(batch.num_tokens)
        b_pad = min(t_pad, _pow2_at_least(self.max_num_seqs, 8))
        assert batch.num_seqs <= b_pad, (batch.num_seqs, b_pad)
        md_arrays, logits_idx = self._attention_metadata(batch, t_pad, b_pad)
        token_ids = np.zeros(t_pad, np.int32)
        token_ids[:batch.num_tokens] = batch.token_ids
        smd = self._sampling_metadata(batch, b_pad)
        prompt_k, next_ids = self._prompt_inputs(batch, t_pad)
        md = AttentionMetadata(**md_arrays, attention_impl=self.attention_impl)
        key = (t_pad, b_pad, md.page_table.shape[1], prompt_k, smd.use_penalties, smd.use_top_k_p, smd.num_logprobs,
               smd.banned_ids.shape[1], smd.prompt_ids.shape[1])
        start = time.perf_counter()
        out, prompt, self.kv_cache = self._run(token_ids, logits_idx, next_ids, md, smd, prompt_k)
        result = self._to_host(out, prompt, batch)
        if key not in self._seen_shapes:
            self._seen_shapes.add(key)
            self.num_compiles += 1
            seconds = time.perf_counter() - start
            self.compile_seconds += seconds
            logger.info("compiled step #%d for tokens=%d seqs=%d pages/seq=%d variant=%s in %.1fs",
                        self.num_compiles, t_pad, b_pad, key[2], key[3:], seconds)
        return result

    def _run(self, token_ids, logits_idx, next_ids, md, smd, prompt_k):
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                return self._step(self.graphdef, self.state, self.kv_cache, token_ids, logits_idx,
                                  next_ids, md, smd, prompt_k)
        return self._step(self.graphdef, self.state, self.kv_cache, token_ids, logits_idx, next_ids,
                          md, smd, prompt_k)

    @staticmethod
    def _to_host(out: SamplerOutput, prompt, batch: Batch) -> StepOutput:
        B, T = batch.num_seqs, batch.num_tokens
        out = jax.device_get(out)
        result = StepOutput(token_ids=np.asarray(out.token_ids[:B]),
                            logprobs=np.asarray(out.logprobs[:B]),
                            top_ids=np.asarray(out.top_ids[:B]),
                            top_logprobs=np.asarray(out.top_logprobs[:B]))
        if prompt is not None:
            nxt, ids, lps = jax.device_get(prompt)
            result.prompt_logprobs = np.asarray(nxt[:T])
            result.prompt_top_ids = np.asarray(ids[:T])
            result.prompt_top_logprobs = np.asarray(lps[:T])
        return result

    @property
    def jit_cache_size(self) -> int:
        return self._step._cache_size()
