"""Work-item schedule shared by the GPU and TPU ragged paged attention kernels.

The wrapper (plain jnp, inside jit) cuts every live sequence's new tokens into blocks of
`tokens_per_block` tokens; each block is one work item, processed against the kv blocks it can see.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Columns of the i32[W, NUM_FIELDS] work table.
SEQ, TOK0, NTOK, POS0, KV_LO, KV_HI, KV_LEN, ZERO_NTOK = range(8)
NUM_FIELDS = 8


def max_work_items(num_tokens: int, num_seqs_max: int, tokens_per_block: int) -> int:
    """Static bound on work items: each sequence adds at most one partial block."""
    return -(-num_tokens // tokens_per_block) + num_seqs_max


def build_work_table(kv_lens, cu_q_lens, num_seqs, *, num_tokens: int, tokens_per_block: int,
                     block_kv: int, sliding_window: int | None) -> jax.Array:
    """i32[W, NUM_FIELDS]: per work item its sequence, first token, token count (0 = idle item),
    position of its first token, and the half-open range [KV_LO, KV_HI) of kv blocks it reads.
    Idle items instead cover the tokens of no live sequence, tokens_per_block each: TOK0 is the
    first and ZERO_NTOK the count (a kernel may write their zero outputs there). There are always
    enough: W - active >= ceil(dead tokens / tokens_per_block)."""
    B = kv_lens.shape[0]
    W = max_work_items(num_tokens, B, tokens_per_block)
    b = jnp.arange(B)
    live = b < num_seqs[0]
    q_lens = jnp.where(live, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    n_blocks = -(-q_lens // tokens_per_block)  # i32[B]
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(n_blocks).astype(jnp.int32)])
    w = jnp.arange(W, dtype=jnp.int32)
    # compare_all: one fused compare, not the default binary-search loop (a launch per step on GPU).
    seq = jnp.searchsorted(cu_blocks[1:], w, side="right", method="compare_all")
    seq = jnp.clip(seq, 0, B - 1).astype(jnp.int32)
    active = w < cu_blocks[B]
    local = (w - cu_blocks[seq]) * tokens_per_block
    tok0 = cu_q_lens[seq] + local
    ntok = jnp.where(active, jnp.minimum(tokens_per_block, q_lens[seq] - local), 0)
    pos0 = kv_lens[seq] - q_lens[seq] + local
    last = pos0 + jnp.maximum(ntok, 1) - 1
    lo = jnp.zeros_like(pos0)
    if sliding_window is not None:
        lo = jnp.maximum(pos0 - sliding_window + 1, 0)
    kv_lo = lo // block_kv
    kv_hi = jnp.where(active, (last + block_kv) // block_kv, kv_lo)
    dead0 = cu_q_lens[jnp.minimum(num_seqs[0], B)] + (w - cu_blocks[B]) * tokens_per_block
    zero_ntok = jnp.where(active, 0, jnp.clip(num_tokens - dead0, 0, tokens_per_block))
    tok0 = jnp.where(active, tok0, dead0)
    cols = [seq, tok0, ntok, pos0, kv_lo, kv_hi, kv_lens[seq], zero_ntok]
    return jnp.stack([c.astype(jnp.int32) for c in cols], axis=1)
