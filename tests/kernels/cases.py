"""Random inputs for the ragged paged attention kernel tests."""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def make_case(rng, *, q_lens, kv_lens, num_q_heads, num_kv_heads, head_dim, page_size,
              dtype=jnp.bfloat16, num_pad_seqs=0, extra_tokens=0, extra_pages=3):
    """Fresh random inputs; page tables are a random permutation of the page pool.

    num_pad_seqs sequences beyond num_seqs get garbage lengths; extra_tokens trailing tokens belong
    to no sequence."""
    q_lens, kv_lens = np.asarray(q_lens), np.asarray(kv_lens)
    B_live = len(q_lens)
    B = B_live + num_pad_seqs
    pages_per_seq = [-(-int(n) // page_size) for n in kv_lens]
    M = max(pages_per_seq) + 1
    P = sum(pages_per_seq) + extra_pages
    perm = rng.permutation(P)
    table = np.zeros((B, M), np.int32)
    off = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[off:off + n]
        table[b, n:] = rng.integers(0, P, M - n)  # junk beyond the live pages
        off += n
    table[B_live:] = rng.integers(0, P, (num_pad_seqs, M))
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(cu[-1]) + extra_tokens
    cu_full = np.concatenate([cu, np.full(num_pad_seqs, cu[-1] + extra_tokens)]).astype(np.int32)
    kv_full = np.concatenate([kv_lens, rng.integers(1, 50, num_pad_seqs)]).astype(np.int32)
    f = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32), dtype)
    return dict(
        q=f(T, num_q_heads, head_dim),
        k_pages=f(P, page_size, num_kv_heads, head_dim),
        v_pages=f(P, page_size, num_kv_heads, head_dim),
        kv_lens=jnp.asarray(kv_full), page_table=jnp.asarray(table), cu_q_lens=jnp.asarray(cu_full),
        num_seqs=jnp.asarray([B_live], jnp.int32))
