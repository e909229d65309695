"""Plain-jnp ragged paged attention: the oracle for the Pallas kernels and the CPU backend.

Slow and obvious: every query token gathers its sequence's whole page table. Tokens go through in
chunks of _TOKEN_CHUNK so a long prefill does not materialise [T, context, K, H] at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_TOKEN_CHUNK = 128
# P is rounded to this before the PV product. The GPU kernel feeds P to its wgmma in bf16;
# scripts/backend_check.py --rounding-probe sets bf16 here to show what that rounding alone does.
PV_DTYPE = jnp.float32


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
    qg = q.reshape(T, K, N // K, H)
    ctx_len = kv_lens[seq]

    def attend(args):  # one chunk of tokens: [c, K, G, H], i32[c] x3, bool[c]
        qc, seqc, posc, lenc, livec = args
        kt = k[seqc].astype(jnp.float32)  # [c, C, K, H]
        vt = v[seqc].astype(jnp.float32)
        s = jnp.einsum("TKGH,TCKH->TKGC", qc.astype(jnp.float32), kt) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        c = jnp.arange(M * S)
        mask = (c[None, :] <= posc[:, None]) & (c[None, :] < lenc[:, None])
        if sliding_window is not None:
            mask &= c[None, :] > posc[:, None] - sliding_window
        mask &= livec[:, None]
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
        denom = jnp.sum(p, axis=-1, keepdims=True)
        pv = jnp.einsum("TKGC,TCKH->TKGH", p.astype(PV_DTYPE).astype(jnp.float32), vt)
        return pv / jnp.where(denom > 0, denom, 1.0)

    args = (qg, seq, pos, ctx_len, live)
    if T <= _TOKEN_CHUNK:
        o = attend(args)
    else:
        pad = -T % _TOKEN_CHUNK
        chunked = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(
            -1, _TOKEN_CHUNK, *a.shape[1:]) for a in args]
        o = jax.lax.map(attend, tuple(chunked)).reshape(T + pad, K, N // K, H)[:T]
    return o.reshape(T, N, H).astype(q.dtype)
