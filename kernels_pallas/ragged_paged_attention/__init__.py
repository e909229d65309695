"""Ragged paged attention: one call per layer over a mixed batch of prefill chunks and decode tokens.

`ragged_paged_attention(..., impl=...)` dispatches to the plain-jnp reference or a Pallas kernel.
Models call only this dispatcher.
"""
from __future__ import annotations

import jax

from kernels_pallas.ragged_paged_attention.reference import ragged_paged_attention_reference

IMPLS = ("reference", "pallas_gpu", "pallas_tpu")


def default_impl(backend: str = "auto", platform: str | None = None) -> str:
    """Map the engine's attention_backend ("auto" | "reference" | "pallas") to an impl for a platform."""
    platform = platform or jax.default_backend()
    if backend == "reference":
        return "reference"
    pallas = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform)
    if backend == "pallas":
        if pallas is None:
            raise ValueError(f"attention_backend='pallas' has no kernel for {platform=}")
        return pallas
    if backend != "auto":
        raise ValueError(f"{backend=} must be 'auto', 'reference' or 'pallas'")
    return pallas if pallas is not None and _kernel_available(pallas) else "reference"


def _kernel_available(impl: str) -> bool:
    try:
        _load(impl)
    except ImportError:
        return False
    return True


def _load(impl: str):
    if impl == "pallas_gpu":
        from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_gpu
        return ragged_paged_attention_gpu
    if impl == "pallas_tpu":
        from kernels_pallas.ragged_paged_attention.kernel_tpu import ragged_paged_attention_tpu
        return ragged_paged_attention_tpu
    if impl == "reference":
        return ragged_paged_attention_reference
    raise ValueError(f"{impl=} must be one of {IMPLS}")


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, impl: str = "reference"):
    """See reference.ragged_paged_attention_reference for the contract; `impl` picks the backend."""
    fn = _load(impl)
    return fn(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
              sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
