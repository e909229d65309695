"""Logits processors of the sampler (pure jnp, inside the jitted step), each with its slow reference:
token controls (logit_bias, the allowed-token bitmask) and penalties (repetition, frequency, presence)
over the runner's on-device token history.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxserve.sampler import SamplingMetadata


# ---- token controls -----------------------------------------------------------------------------
def apply_token_controls(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """logit_bias (a scatter-add of [B, NB]), then -inf where the token mask's bit is clear (the
    bits unpacked by a shift over a [B, W, 32] broadcast: no gather). One pass over [B, V]."""
    B, V = logits.shape
    if md.bias_ids.shape[1]:
        rows = jnp.arange(B)[:, None]
        logits = logits.at[rows, md.bias_ids].add(md.bias_values, mode="drop")
    W = md.token_mask.shape[1]
    if W:
        shifts = jnp.arange(32, dtype=jnp.int32)[None, None, :]
        bits = jax.lax.shift_right_logical(md.token_mask[:, :, None], shifts) & 1
        allowed = bits.reshape(B, W * 32)[:, :V] == 1
        logits = jnp.where(allowed, logits, -jnp.inf)
    return logits


def apply_token_controls_reference(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """The obvious version: a loop over rows and tokens in numpy (tests only)."""
    out = np.array(logits, np.float32)
    for b in range(out.shape[0]):
        for t, v in zip(np.asarray(md.bias_ids[b]).tolist(), np.asarray(md.bias_values[b]).tolist()):
            if t < out.shape[1]:
                out[b, t] += v
        if md.token_mask.shape[1]:
            words = np.asarray(md.token_mask[b]).view(np.uint32)
            for t in range(out.shape[1]):
                if not (int(words[t // 32]) >> (t % 32)) & 1:
                    out[b, t] = -np.inf
    return jnp.asarray(out)


# ---- penalties ----------------------------------------------------------------------------------
def apply_penalties(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """vLLM semantics, O(B*L) gathers/scatters over md.history_ids: repetition over prompt+output,
    then frequency (per occurrence) and presence (once) over the output.

    Scatter-set with duplicate ids is deterministic here because every duplicate writes the same
    value (computed from the one original logit); the frequency term is a scatter-add."""
    B, V = logits.shape
    ids = md.history_ids
    is_out = jnp.arange(ids.shape[1])[None, :] >= md.prompt_lens[:, None]
    orig = jnp.take_along_axis(logits, jnp.minimum(ids, V - 1), axis=1)  # f32[B, L]
    rep = md.repetition_penalty[:, None]
    penalized = jnp.where(orig > 0, orig / rep, orig * rep)
    rows = jnp.arange(B)[:, None]
    prompt_ids, out_ids = jnp.where(is_out, V, ids), jnp.where(is_out, ids, V)
    logits = logits.at[rows, prompt_ids].set(penalized, mode="drop")
    logits = logits.at[rows, out_ids].set(penalized - md.presence_penalty[:, None], mode="drop")
    freq = jnp.broadcast_to(-md.frequency_penalty[:, None], ids.shape)
    return logits.at[rows, out_ids].add(freq, mode="drop")


def read_history(history, token_slot, row_slot, token_ids, md, vocab: int):
    """The runner's token history i32[R, L_max] <- this step's input tokens i32[T] at (token_slot
    i32[T], md.positions); returns (history, i32[B, L_max] tokens at positions 0..L-1 of row_slot
    i32[B]'s sequences, pad = vocab past md.kv_lens or without a row). Out-of-range rows drop."""
    history = history.at[token_slot, md.positions].set(token_ids, mode="drop")
    ids = history.at[row_slot].get(mode="fill", fill_value=vocab)
    valid = jnp.arange(ids.shape[1])[None, :] < md.kv_lens[:, None]
    return history, jnp.where(valid, ids, vocab)


def write_prefix(history, slots, ids):
    """history[slots[i], :W] <- ids[i] (i32[N, W]; pad rows slot = num rows): the tokens before a
    sequence's first chunk (prefix-cache hits, or all of them after its row was reassigned)."""
    cols = jnp.arange(ids.shape[1])[None, :]
    return history.at[slots[:, None], cols].set(ids, mode="drop")


def _counts(ids: jax.Array, vocab: int) -> jax.Array:
    """i32[B, L] (pad = vocab) -> f32[B, V] occurrence counts."""
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], vocab), jnp.float32).at[rows, ids].add(1.0, mode="drop")


def apply_penalties_reference(logits, prompt_ids, output_ids, md: SamplingMetadata) -> jax.Array:
    """The slow, obvious version (the test oracle): [B, V] counts of i32[B, Lp] prompt and
    i32[B, Lo] output ids (pad = V)."""
    vocab = logits.shape[-1]
    out_counts = _counts(output_ids, vocab)
    seen = (out_counts + _counts(prompt_ids, vocab)) > 0
    rep = md.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - md.frequency_penalty[:, None] * out_counts
    return logits - md.presence_penalty[:, None] * (out_counts > 0)
