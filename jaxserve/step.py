"""The body of a compiled engine step (jaxserve/runner.py jits these): the model's forward pass
on the padded batch, the sampler on its last-token logits, and both fused. Pure functions of
arrays; the runner owns shapes, buckets, compilation and the buffers."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kv_cache import AttentionMetadata, KVCache
from jaxserve.logits_processors import read_history
from jaxserve.sampler import SamplingMetadata, sample
from jaxserve.sampling_inputs import PenaltyInputs
from jaxserve.sharding import replicated, rows_parallel, shard


def forward(graphdef, state, kv_cache: KVCache, history, prev_tokens, token_ids, token_src,
             logits_idx, next_ids, md: AttentionMetadata, pen: PenaltyInputs | None,
             prompt_logprobs_k: int):
    """The model part of a step: (logits [B, V], the penalty rows' token history i32[B, L] or None,
    prompt logprob triple or None, new KVCache, new history). prev_tokens: the previous step's
    padded sampled tokens; history: i32[R, max_model_len] or None (no penalties this step)."""
    model = nnx.merge(graphdef, state)
    token_ids = jnp.where(token_src >= 0, prev_tokens[jnp.maximum(token_src, 0)], token_ids)
    hidden, kv_cache = model(token_ids, md, kv_cache)
    # Pinned shardings: a deferred step's sample executable (one per row count) takes these from
    # forward executables of several token buckets, which left alone could differ at TP > 1.
    logits = shard(model.compute_logits(hidden[logits_idx]), "batch", "vocab")
    ids = None
    if pen is not None:
        history, ids = read_history(history, pen.token_slot, pen.row_slot, token_ids, md,
                                    logits.shape[-1])
        ids = replicated(ids)
    prompt = None
    if prompt_logprobs_k >= 0:
        with jax.named_scope("prompt_logprobs"):
            all_logprobs = jax.nn.log_softmax(model.compute_logits(hidden).astype(jnp.float32), -1)
            nxt = jnp.take_along_axis(all_logprobs, next_ids[:, None], axis=-1)[:, 0]
            top_lp, top_ids = jax.lax.top_k(all_logprobs, prompt_logprobs_k)
            prompt = (nxt, top_ids.astype(jnp.int32), top_lp)
    return logits, ids, prompt, kv_cache, history


def sample_step(logits, smd: SamplingMetadata, history_ids, prev_tokens):
    """The sampling part: (SamplerOutput, tokens padded to prev_tokens' size)."""
    if history_ids is not None:
        smd = dataclasses.replace(smd, history_ids=history_ids)
    # Vocab-split logits (_forward: never the lm_head gathered) sampled by whole rows per model
    # shard: no collective inside the sampler's lax.conds (benchmarks/tp_collectives.py).
    out = jax.tree.map(replicated, rows_parallel(sample)(logits, smd))
    return out, replicated(jnp.zeros_like(prev_tokens).at[:out.token_ids.shape[0]].set(
        out.token_ids))


def step(graphdef, state, kv_cache: KVCache, history, prev_tokens, token_ids, token_src,
          logits_idx, next_ids, md: AttentionMetadata, smd: SamplingMetadata,
          pen: PenaltyInputs | None, prompt_logprobs_k: int):
    """The compiled step, forward and sample fused: (SamplerOutput, padded tokens, prompt logprob
    triple or None, new KVCache, new history)."""
    logits, ids, prompt, kv_cache, history = forward(
        graphdef, state, kv_cache, history, prev_tokens, token_ids, token_src, logits_idx,
        next_ids, md, pen, prompt_logprobs_k)
    out, padded = sample_step(logits, smd, ids, prev_tokens)
    return out, padded, prompt, kv_cache, history
