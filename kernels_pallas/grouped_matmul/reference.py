"""Plain-jnp grouped matmul (jax.lax.ragged_dot's semantics): the oracle for the Pallas kernel.
Every group's matmul runs over every row and a row keeps the result of its own group. Slow.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """i32[G] group sizes -> i32[M] group of each row; rows past sum(group_sizes) get G."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))  # [G] row after each group's last
    return jnp.searchsorted(ends, jnp.arange(num_rows, dtype=jnp.int32), side="right")


def grouped_matmul_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """lhs [M, K], rhs [G, K, N], group_sizes i32[G] -> [M, N] in lhs's dtype, all in f32.

    Rows offset_g .. offset_g + size_g - 1 (offset_g = sum of the sizes before g) use rhs[g];
    rows past sum(group_sizes) are zero.
    """
    groups = row_groups(group_sizes, lhs.shape[0])  # [M]
    x = lhs.astype(jnp.float32)
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        y = jnp.matmul(x, rhs[g].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        out = jnp.where((groups == g)[:, None], y, out)
    return out.astype(lhs.dtype)
