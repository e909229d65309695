"""Grouped matmul for mixture-of-experts (models/moe.py): rows sorted by expert times that expert's
weight, jax.lax.ragged_dot's semantics. XLA:GPU lowers ragged_dot densely (it materializes
[rows, experts, K]), so on GPU the Pallas kernel runs instead. Models call only grouped_matmul.
"""
from __future__ import annotations

import jax

from kernels_pallas.grouped_matmul.reference import grouped_matmul_reference

IMPLS = ("auto", "pallas", "xla", "reference")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   impl: str = "auto") -> jax.Array:
    """lhs [M, K], rhs [G, K, N], group_sizes i32[G] -> [M, N] in lhs's dtype (f32 accumulation).

    Rows offset_g .. offset_g + size_g - 1 use rhs[g]; rows past sum(group_sizes) are zero.
    impl "auto": the Pallas kernel on GPU when K and N are multiples of 16, else "xla"
    (jax.lax.ragged_dot, today's CPU path); "pallas" forces the kernel (interpret mode off GPU);
    "reference" is the per-group f32 oracle.
    """
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} must be [M, K] and [G, K, N]")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"{group_sizes.shape=} must be ({rhs.shape[0]},), one size per group")
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto":
        fits = lhs.shape[1] % 16 == 0 and rhs.shape[2] % 16 == 0
        impl = "pallas" if fits and on_gpu else "xla"
    if impl == "pallas":
        from kernels_pallas.grouped_matmul.kernel import grouped_matmul_pallas

        return grouped_matmul_pallas(lhs, rhs, group_sizes, interpret=not on_gpu)
    if impl == "xla":
        return jax.lax.ragged_dot(lhs, rhs, group_sizes)
    return grouped_matmul_reference(lhs, rhs, group_sizes)
