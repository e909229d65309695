"""Plain-jnp ragged paged attention: the oracle for the Pallas kernels and the CPU backend.

Slow and obvious: every query token gathers its sequence's whole page table.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H] queries of all sequences, flattened
    k_pages: jax.Array,  # [P, S, K, H]
    v_pages: jax.Array,  # [P, S, K, H]
    kv_lens: jax.Array,  # i32[B] context length of each sequence, new tokens included
    page_table: jax.Array,  # i32[B, M]
    cu_q_lens: jax.Array,  # i32[B+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, N, H]
    """Causal attention of each sequence's new tokens over its paged context.

    Token t of sequence b (cu_q_lens[b] <= t < cu_q_lens[b+1]) sits at position
    kv_lens[b] - q_len[b] + (t - cu_q_lens[b]) and sees context positions <= its own (and, with a
    sliding window W, > its own - W). Tokens of no live sequence produce zeros.
    """
    T, N, H = q.shape
    _, S, K, _ = k_pages.shape
    B, M = page_table.shape
    if N % K:
        raise ValueError(f"num_q_heads={N} must be divisible by num_kv_heads={K}")
    t = jnp.arange(T)
    # Sequence of each token: number of cu_q_lens[1:] boundaries at or before t.
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right")
    live = (seq < num_seqs[0]) & (t < cu_q_lens[jnp.minimum(num_seqs[0], B)])
    seq = jnp.minimum(seq, B - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])  # i32[T]

    k = k_pages[page_table].reshape(B, M * S, K, H)  # [B, C, K, H]
    v = v_pages[page_table].reshape(B, M * S, K, H)
    kt = k[seq].astype(jnp.float32)  # [T, C, K, H]
    vt = v[seq].astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(T, K, N // K, H)
    s = jnp.einsum("TKGH,TCKH->TKGC", qg, kt) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    c = jnp.arange(M * S)
    mask = (c[None, :] <= pos[:, None]) & (c[None, :] < kv_lens[seq][:, None])
    if sliding_window is not None:
        mask &= c[None, :] > pos[:, None] - sliding_window
    mask &= live[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("TKGC,TCKH->TKGH", p, vt) / jnp.where(denom > 0, denom, 1.0)
    return o.reshape(T, N, H).astype(q.dtype)
