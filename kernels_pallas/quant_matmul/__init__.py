"""Matmuls with int4 weights kept packed (AWQ/GPTQ, see models/quant.py): a Pallas kernel for
decode-shaped inputs and a dequantizing XLA path for prefill. Models call only int4_matmul.
"""
from __future__ import annotations

import jax

from kernels_pallas.quant_matmul.reference import (int4_matmul_reference, int4_matmul_xla)

IMPLS = ("auto", "pallas_gpu", "xla", "reference")
MAX_KERNEL_ROWS = 64  # above this many tokens the matmul is compute-bound: dequantize + GEMM


def int4_matmul(x, qweight, scales, zeros, *, group_size: int, impl: str = "auto"):
    """x [M, I] @ int4 weight (qweight i32[I/8, O], scales/zeros f16[I/g, O]) -> [M, O].

    impl "auto": the Pallas kernel on GPU for M <= MAX_KERNEL_ROWS when its shape rules hold,
    else "xla" (dequantize to x's dtype, one matmul); "reference" is the f32 oracle.
    """
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    if impl == "auto":
        fits = (x.shape[0] <= MAX_KERNEL_ROWS and group_size % 128 == 0
                and qweight.shape[1] % 16 == 0)
        impl = "pallas_gpu" if fits and jax.default_backend() == "gpu" else "xla"
    if impl == "pallas_gpu":
        from kernels_pallas.quant_matmul.kernel import int4_matmul_pallas

        return int4_matmul_pallas(x, qweight, scales, zeros, group_size=group_size)
    fn = int4_matmul_xla if impl == "xla" else int4_matmul_reference
    return fn(x, qweight, scales, zeros, group_size=group_size)
