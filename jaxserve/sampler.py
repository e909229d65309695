"""Sampler: logits -> next tokens (and logprobs), on device, inside the jitted step.

Per-sequence keys come from (seed, number of tokens so far), so a request's samples do not depend on
what else is in the batch. Greedy rows (temperature 0) take the argmax of the penalized logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass
class SamplingMetadata:
    """Row b describes sequence b of the step (padding rows: temperature 0, no penalties)."""

    temperature: jax.Array  # f32[B]; 0 = greedy
    top_k: jax.Array  # i32[B]; 0 = off
    top_p: jax.Array  # f32[B]
    min_p: jax.Array  # f32[B]
    seeds: jax.Array  # u32[B] per-sequence seed
    counters: jax.Array  # i32[B] tokens so far (folded into the key: a fresh draw each step)
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    repetition_penalty: jax.Array  # f32[B]
    banned_ids: jax.Array  # i32[B, E] tokens forbidden this step (EOS under min_tokens); pad = V
    prompt_ids: jax.Array  # i32[B, Lp] for repetition penalty; pad = V ([B, 0] when unused)
    output_ids: jax.Array  # i32[B, Lo] for all penalties; pad = V ([B, 0] when unused)
    # Static (compile-relevant):
    use_penalties: bool = False
    use_top_k_p: bool = False  # any row has top_k, top_p < 1 or min_p > 0
    num_logprobs: int = 0  # top logprobs returned per row (0 = only the sampled token's)


jax.tree_util.register_dataclass(
    SamplingMetadata,
    data_fields=["temperature", "top_k", "top_p", "min_p", "seeds", "counters", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "banned_ids", "prompt_ids", "output_ids"],
    meta_fields=["use_penalties", "use_top_k_p", "num_logprobs"],
)


@dataclass
class SamplerOutput:
    token_ids: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B] log-probability of the sampled token (raw model distribution)
    top_ids: jax.Array  # i32[B, k]
    top_logprobs: jax.Array  # f32[B, k]


jax.tree_util.register_dataclass(
    SamplerOutput, data_fields=["token_ids", "logprobs", "top_ids", "top_logprobs"], meta_fields=[])


def _counts(ids: jax.Array, vocab: int) -> jax.Array:
    """i32[B, L] (pad = vocab) -> f32[B, V] occurrence counts."""
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], vocab), jnp.float32).at[rows, ids].add(1.0, mode="drop")


def apply_penalties(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """vLLM semantics: repetition over prompt+output; presence/frequency over output only."""
    vocab = logits.shape[-1]
    out_counts = _counts(md.output_ids, vocab)
    seen = (out_counts + _counts(md.prompt_ids, vocab)) > 0
    rep = md.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - md.frequency_penalty[:, None] * out_counts
    return logits - md.presence_penalty[:, None] * (out_counts > 0)


def _truncate(scaled: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Mask logits outside top_k / top_p / min_p with -inf (ties at the cut-off are kept)."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(md.top_k > 0, md.top_k, vocab)[:, None]
    keep = (rank < k) & ((cum - probs) < md.top_p[:, None])
    keep &= probs >= md.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    # Smallest kept logit of each row is the threshold.
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits: jax.Array, md: SamplingMetadata) -> SamplerOutput:
    """f32[B, V] logits -> SamplerOutput. Logprobs are of the raw (unpenalized) distribution."""
    with jax.named_scope("sample"):
        logits = logits.astype(jnp.float32)
        raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
        if md.use_penalties:
            logits = apply_penalties(logits, md)
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = logits.at[rows, md.banned_ids].set(-jnp.inf, mode="drop")
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        temp = jnp.where(md.temperature > 0, md.temperature, 1.0)[:, None]
        scaled = logits / temp
        if md.use_top_k_p:
            scaled = _truncate(scaled, md)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(md.seeds, md.counters)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],), jnp.float32))(keys)
        sampled = jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)
        tokens = jnp.where(md.temperature > 0, sampled, greedy)
        token_logprobs = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
        top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, md.num_logprobs)
        return SamplerOutput(tokens, token_logprobs, top_ids.astype(jnp.int32), top_logprobs)
