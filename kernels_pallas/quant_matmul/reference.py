"""Plain-jnp int4 matmuls: the oracle for the Pallas kernel (f32, no tiling) and the dequantizing
XLA path used for prefill-shaped inputs and wherever the kernel does not apply.

Packing (written by models.quant.pack_int4): qweight i32[I/8, O]; within each group of g input rows
packed row r's nibble j (bits 4j..4j+3) holds input row j * g/8 + r. w = (q - zero) * scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dequantize_int4(qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *, group_size: int,
                    dtype=jnp.float32) -> jax.Array:
    """qweight i32[I/8, O], scales/zeros [G, O] -> w [I, O] in `dtype` (computed in f32)."""
    packed_rows, O = qweight.shape
    r = group_size // 8
    G = packed_rows // r
    words = qweight.reshape(G, r, O)
    nibbles = jnp.stack([jax.lax.shift_right_logical(words, 4 * j) & 0xF for j in range(8)],
                        axis=1)  # [G, 8, r, O]: row j * r + i of group g
    q = nibbles.reshape(G, group_size, O).astype(jnp.float32)
    w = (q - zeros.astype(jnp.float32)[:, None, :]) * scales.astype(jnp.float32)[:, None, :]
    return w.reshape(G * group_size, O).astype(dtype)


def int4_matmul_reference(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array,
                          *, group_size: int) -> jax.Array:
    """x [M, I] @ dequantize(qweight) [I, O] -> [M, O] in x's dtype, all in f32."""
    w = dequantize_int4(qweight, scales, zeros, group_size=group_size)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def int4_matmul_xla(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                    group_size: int) -> jax.Array:
    """Prefill path: dequantize to x's dtype (bf16 tiles XLA fuses into the matmul's operand) and
    one matmul with f32 accumulation."""
    w = dequantize_int4(qweight, scales, zeros, group_size=group_size, dtype=x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
