"""Grouped matmul (jax.lax.ragged_dot's semantics) as a Pallas kernel: Triton lowering on GPU,
interpret mode on CPU. Rows arrive sorted by group (expert); each group uses its own rhs[g].

Design. Rows are cut into tiles of block_m at multiples of block_m. A tile schedule, computed on
device from group_sizes (jnp, static shapes, no host sync), lists for every group the tiles that
overlap it as entries (group, lo, hi): the absolute rows lo..hi-1 of that group inside one tile.
A tile that straddles a group boundary appears once per group it touches. The rows past
sum(group_sizes) form one more group, G, whose entries write zeros (ragged_dot's contract), so
every output row is written by exactly one entry. Groups are contiguous and cover all M rows, so
the schedule has at most cdiv(M, block_m) + G entries; the grid is sized by that static bound and
unused entries have lo == hi and do nothing.

A program (entry, column block) loads its tile's rows [block_m, K] block_k columns at a time,
masked to its group's rows, dots them with rhs[g, k-chunk, n-block] into an f32 accumulator and
stores rows lo..hi-1 with a masked store. The two entries of a straddling tile write disjoint
rows, so they need no read-modify-write and there is no padded copy of lhs or of the output: the
kernel reads lhs in place and writes the final [M, N] directly. A straddling tile costs one more
pass over rhs[g]'s column block (at decode, the weight read the matmul is bound by); default_tiles
keeps those few by sizing block_m near the mean group size.

Grid order: one axis of entries x (N / block_n) programs, in bands of SWIZZLE_ENTRIES entries
(Triton's grouped ordering, program_tile). Programs running together then share a few lhs tiles
and a few rhs column blocks in L2, and the entries of one group (adjacent in the schedule) read
each rhs block at about the same time, so it comes from HBM about once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_DOT = 16  # Triton's smallest dot dimension: block_m, block_n and block_k reach it
MAX_BLOCK_M = 128
SWIZZLE_ENTRIES = 8  # entries per band of the grid order (Triton's GROUP_SIZE_M)


def tile_schedule(group_sizes: jax.Array, num_rows: int, block_m: int):
    """i32[G] group sizes -> (group, lo, hi), each i32[cdiv(num_rows, block_m) + G].

    Entry e covers rows lo[e]..hi[e]-1 of group group[e], all inside the tile starting at
    (lo[e] // block_m) * block_m. group G means "rows past the total: write zeros". Unused
    entries have lo == hi == 0. Sizes past num_rows are clipped (ragged_dot leaves it undefined).
    """
    G = group_sizes.shape[0]
    num_entries = pl.cdiv(num_rows, block_m) + G
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    ends = jnp.append(ends, num_rows)  # [G + 1]: group G is the zero tail
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    first_tile = starts // block_m
    counts = jnp.where(ends > starts, (ends - 1) // block_m - first_tile + 1, 0)  # tiles per group
    cu_counts = jnp.cumsum(counts)  # [G + 1], inclusive
    entry = jnp.arange(num_entries, dtype=jnp.int32)
    group = jnp.searchsorted(cu_counts, entry, side="right").astype(jnp.int32)  # G + 1: unused
    used = group <= G
    group = jnp.minimum(group, G)
    tile_start = (first_tile[group] + entry - (cu_counts[group] - counts[group])) * block_m
    lo = jnp.where(used, jnp.maximum(starts[group], tile_start), 0)
    hi = jnp.where(used, jnp.minimum(ends[group], tile_start + block_m), 0)
    return group, lo.astype(jnp.int32), hi.astype(jnp.int32)


def program_tile(pid, num_entries: int, num_n: int):
    """Program pid of the 1-D grid -> (entry, column block): bands of SWIZZLE_ENTRIES entries,
    column block by column block, entry fastest within a band. A bijection onto all pairs."""
    per_band = SWIZZLE_ENTRIES * num_n
    first = jax.lax.div(pid, per_band) * SWIZZLE_ENTRIES  # first entry of pid's band
    band_entries = jnp.minimum(num_entries - first, SWIZZLE_ENTRIES)
    within = jax.lax.rem(pid, per_band)
    return first + jax.lax.rem(within, band_entries), jax.lax.div(within, band_entries)


def _kernel(group_ref,  # i32[E] schedule: group of each entry (G = zero tail)
            lo_ref,  # i32[E] first row of the entry
            hi_ref,  # i32[E] row after the entry's last
            lhs_ref,  # [M, K] rows sorted by group (whole)
            rhs_ref,  # [G, K, block_n] this program's column block of every group
            out_ref,  # [M, block_n]
            *, block_m: int, block_k: int, num_groups: int, num_n: int):
    e, _ = program_tile(pl.program_id(0), group_ref.shape[0], num_n)
    g, lo, hi = group_ref[e], lo_ref[e], hi_ref[e]
    start = jax.lax.div(lo, block_m) * block_m  # lo >= 0: plain division (no floor fixup)
    rows = start + jnp.arange(block_m, dtype=jnp.int32)
    in_entry = (rows >= lo) & (rows < hi)  # [block_m]
    block_n = out_ref.shape[1]
    out_rows = out_ref.at[pl.ds(start, block_m), :]
    out_mask = jnp.broadcast_to(in_entry[:, None], (block_m, block_n))

    @pl.when((hi > lo) & (g < num_groups))
    def _():
        x_mask = jnp.broadcast_to(in_entry[:, None], (block_m, block_k))
        # f32 inputs: full precision (Triton's default for f32 dots is TF32, ~1e-3 relative)
        precision = jax.lax.Precision.HIGHEST if lhs_ref.dtype == jnp.float32 else None

        def k_step(i, acc):  # acc f32[block_m, block_n]
            k0 = pl.multiple_of(i * block_k, block_k)
            x = pltriton.load(lhs_ref.at[pl.ds(start, block_m), pl.ds(k0, block_k)],
                              mask=x_mask, other=0)
            w = rhs_ref[g, pl.ds(k0, block_k), :].astype(x.dtype)  # [block_k, block_n]
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)

        acc = jnp.zeros((block_m, block_n), jnp.float32)
        acc = jax.lax.fori_loop(0, lhs_ref.shape[1] // block_k, k_step, acc)
        pltriton.store(out_rows, acc.astype(out_ref.dtype), mask=out_mask)

    @pl.when((hi > lo) & (g == num_groups))
    def _():
        pltriton.store(out_rows, jnp.zeros((block_m, block_n), out_ref.dtype), mask=out_mask)


def default_tiles(num_rows: int, K: int, N: int, num_groups: int, dtype) -> tuple[int, int, int]:
    """(block_m, block_n, block_k): block_m the power of two nearest above the mean group size,
    in [16, 128] (decode: few straddling tiles, so few extra passes over the weights; prefill:
    full 128-row tiles); block_n / block_k the widest of 128/64/32/16 (block_k: 64, f32: 32)
    dividing N / K."""
    mean_rows = max(1, -(-num_rows // num_groups))
    block_m = min(MAX_BLOCK_M, max(MIN_DOT, 1 << (mean_rows - 1).bit_length()))
    block_n = next((b for b in (128, 64, 32, 16) if N % b == 0), None)
    widest_k = 32 if jnp.dtype(dtype) == jnp.float32 else 64
    block_k = next((b for b in (64, 32, 16) if K % b == 0 and b <= widest_k), None)
    if block_n is None or block_k is None:
        raise ValueError(f"K={K} and N={N} must be multiples of {MIN_DOT} for the grouped "
                         f"matmul kernel (use impl='xla')")
    return block_m, block_n, block_k


def _check_tiles(M, K, N, block_m, block_n, block_k):
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if b < MIN_DOT or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two >= {MIN_DOT}")
    if N % block_n or K % block_k:
        raise ValueError(f"{block_n=} must divide N={N} and {block_k=} must divide K={K} "
                         f"(lhs [{M}, {K}])")


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret"))
def grouped_matmul_pallas(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                          block_m: int | None = None, block_n: int | None = None,
                          block_k: int | None = None, interpret: bool = False) -> jax.Array:
    """lhs [M, K] @ rhs[group of the row] -> [M, N] in lhs's dtype, f32 accumulation.

    Args:
      lhs: [M, K] rows sorted by group; any M (the last tile is masked).
      rhs: [G, K, N]; K and N multiples of 16 (ValueError otherwise).
      group_sizes: i32[G]; rows offset_g .. offset_g + size_g - 1 use rhs[g], rows past the
        sum are zero.
      block_m, block_n, block_k: tiles (None: default_tiles).
    """
    (M, K), (G, K2, N) = lhs.shape, rhs.shape
    if K2 != K or group_sizes.shape != (G,):
        raise ValueError(f"lhs {lhs.shape}, rhs {rhs.shape} and group_sizes "
                         f"{group_sizes.shape} must be [M, K], [G, K, N] and [G]")
    if M == 0:
        return jnp.zeros((0, N), lhs.dtype)
    dm, dn, dk = default_tiles(M, K, N, G, lhs.dtype)
    block_m, block_n, block_k = block_m or dm, block_n or dn, block_k or dk
    _check_tiles(M, K, N, block_m, block_n, block_k)
    schedule = tile_schedule(group_sizes, M, block_m)
    num_entries = schedule[0].shape[0]
    num_n = N // block_n
    kernel = functools.partial(_kernel, block_m=block_m, block_k=block_k, num_groups=G,
                               num_n=num_n)

    def column(pid):
        return program_tile(pid, num_entries, num_n)[1]

    whole_schedule = pl.BlockSpec((num_entries,), lambda pid: (0,))
    return pl.pallas_call(
        kernel,
        grid=(num_entries * num_n,),
        in_specs=[whole_schedule, whole_schedule, whole_schedule,
                  pl.BlockSpec((M, K), lambda pid: (0, 0)),
                  pl.BlockSpec((G, K, block_n), lambda pid: (0, 0, column(pid)))],
        out_specs=pl.BlockSpec((M, block_n), lambda pid: (0, column(pid))),
        out_shape=jax.ShapeDtypeStruct((M, N), lhs.dtype),
        interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=3),
        name=f"grouped_matmul_{block_m=}_{block_n=}_{block_k=}",
    )(*schedule, lhs, rhs)
