"""int4 x bf16 matmul for decode-shaped inputs (small M), Pallas (Triton lowering on GPU; interpret
mode on CPU). The weight stays packed in memory: each program streams its [I/8, block_n] column
slab group by group, unpacks a group's 8 nibble planes with a shift and a mask, and applies scale
and zero once per group: x @ ((q - z) * s) = s * (x @ q - z * sum(x)) over the group's rows.

Grid (O / block_n, num_splits): the second axis splits I (split-K) so that a decode matmul, whose
O / block_n alone is fewer programs than the GPU has SMs, still streams from every SM; the wrapper
sums the f32 partials.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

PACK = 8  # nibbles per int32 word
MIN_DOT = 16  # Triton's smallest dot dimension: M is padded to it, g/8 and block_n must reach it
TARGET_PROGRAMS = 512  # ~4 per SM on an H200 (132 SMs): enough loads in flight to hide latency


def _kernel(x_ref,  # [Mp, I] activations (whole)
            w_ref,  # [I/8, block_n] i32 packed columns (whole I)
            s_ref,  # [G, block_n] f16 scales
            z_ref,  # [G, block_n] f16 zero points
            o_ref,  # [1, Mp, block_n] f32 partial sum of this split
            *, group_size: int, groups_per_split: int):
    r = group_size // PACK
    first = pl.program_id(1) * groups_per_split

    def group(i, acc):  # acc f32[Mp, block_n]
        g = first + i
        words = w_ref[pl.ds(g * r, r), :]  # [r, block_n]
        part = jnp.zeros(acc.shape, jnp.float32)
        x_sum = jnp.zeros((acc.shape[0], 1), jnp.float32)
        for j in range(PACK):
            xj = x_ref[:, pl.ds(g * group_size + j * r, r)]  # [Mp, r]
            qj = (jax.lax.shift_right_logical(words, 4 * j) & 0xF).astype(xj.dtype)  # [r, bn]
            # f32 inputs: full precision (Triton's default for f32 dots is TF32, ~1e-3 relative)
            precision = jax.lax.Precision.HIGHEST if xj.dtype == jnp.float32 else None
            part += jnp.dot(xj, qj, preferred_element_type=jnp.float32, precision=precision)
            x_sum += jnp.sum(xj.astype(jnp.float32), axis=1, keepdims=True)
        s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, block_n]
        z = z_ref[pl.ds(g, 1), :].astype(jnp.float32)
        return acc + s * (part - x_sum * z)

    acc = jnp.zeros(o_ref.shape[1:], jnp.float32)
    o_ref[0] = jax.lax.fori_loop(0, groups_per_split, group, acc)


def default_tiles(out_features: int, num_groups: int) -> tuple[int, int]:
    """(block_n, num_splits): the widest block_n of 128/64/32/16 dividing O, then the divisor of
    the group count that brings the grid nearest TARGET_PROGRAMS without exceeding it."""
    block_n = next((b for b in (128, 64, 32, 16) if out_features % b == 0), None)
    if block_n is None:
        raise ValueError(f"out_features={out_features} must be a multiple of {MIN_DOT}")
    want = max(1, TARGET_PROGRAMS // (out_features // block_n))
    splits = max(d for d in range(1, num_groups + 1) if num_groups % d == 0 and d <= want)
    return block_n, splits


@functools.partial(jax.jit, static_argnames=("group_size", "block_n", "num_splits", "interpret"))
def int4_matmul_pallas(x: jax.Array, qweight: jax.Array, scales: jax.Array, zeros: jax.Array, *,
                       group_size: int, block_n: int | None = None, num_splits: int | None = None,
                       interpret: bool = False) -> jax.Array:
    """x [M, I] (bf16/f32) @ int4 weight -> [M, O] in x's dtype.

    Args:
      x: [M, I] activations; M is padded to a power of two >= 16 inside.
      qweight: i32[I/8, O] packed as models.quant.pack_int4 (see reference.py).
      scales, zeros: f16[G, O], G = I / group_size.
      group_size: input rows per scale; a multiple of 128 (g/8 rows per Triton dot).
      block_n, num_splits: tiles (None: default_tiles).
    """
    M, I = x.shape
    packed_rows, O = qweight.shape
    if group_size % 128:
        raise ValueError(f"{group_size=} must be a multiple of 128")
    if I % group_size or packed_rows * PACK != I:
        raise ValueError(f"x [{M}, {I}] and qweight {qweight.shape} disagree ({group_size=})")
    G = I // group_size
    if scales.shape != (G, O) or zeros.shape != (G, O):
        raise ValueError(f"{scales.shape=} and {zeros.shape=} must be {(G, O)}")
    default_n, default_splits = default_tiles(O, G)
    block_n, num_splits = block_n or default_n, num_splits or default_splits
    if O % block_n or block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"{block_n=} must divide out_features={O} and be a power of two >= 16")
    if G % num_splits:
        raise ValueError(f"{num_splits=} must divide the {G} groups")
    Mp = max(MIN_DOT, 1 << (M - 1).bit_length())  # Triton loads power-of-two shapes
    xp = jnp.pad(x, ((0, Mp - M), (0, 0)))
    kernel = functools.partial(_kernel, group_size=group_size, groups_per_split=G // num_splits)
    whole_i = lambda n, s: (0, 0)
    partials = pl.pallas_call(
        kernel,
        grid=(O // block_n, num_splits),
        in_specs=[pl.BlockSpec((Mp, I), whole_i),
                  pl.BlockSpec((packed_rows, block_n), lambda n, s: (0, n)),
                  pl.BlockSpec((G, block_n), lambda n, s: (0, n)),
                  pl.BlockSpec((G, block_n), lambda n, s: (0, n))],
        out_specs=pl.BlockSpec((1, Mp, block_n), lambda n, s: (s, 0, n)),
        out_shape=jax.ShapeDtypeStruct((num_splits, Mp, O), jnp.float32),
        interpret=interpret,
        compiler_params=_triton_params(),
        name=f"int4_matmul_{block_n=}_{num_splits=}",
    )(xp, qweight, scales, zeros)
    return partials.sum(axis=0)[:M].astype(x.dtype)


def _triton_params():
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=3)
