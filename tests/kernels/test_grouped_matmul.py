"""Grouped matmul (kernels_pallas/grouped_matmul): the Pallas kernel against the per-group f32
reference on awkward group layouts, the reference against jax.lax.ragged_dot, the tile schedule's
invariants, the dispatcher, and models.moe.grouped_experts running on the kernel.

On CPU the kernel runs in interpret mode (INTERPRET=True); with JAXSERVE_TEST_GPU=1 on a GPU the
same tests run it compiled (Triton lowering).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.grouped_matmul import grouped_matmul
from kernels_pallas.grouped_matmul.kernel import (default_tiles, grouped_matmul_pallas,
                                                  program_tile, tile_schedule)
from kernels_pallas.grouped_matmul.reference import grouped_matmul_reference
from models.moe import experts_reference, grouped_experts, route

INTERPRET = jax.default_backend() != "gpu"


def _sizes_128(rng, total):  # 128 groups, a third of them empty, summing to `total`
    cuts = np.sort(rng.integers(0, total + 1, 127))
    sizes = np.diff(np.concatenate([[0], cuts, [total]]))
    sizes[rng.permutation(128)[:40]] = 0
    return sizes


# (M, K, N, group sizes, block_m, block_k): the name says what is awkward.
CASES = {
    "empty_groups": (25, 32, 16, [0, 5, 0, 20, 0], None, None),
    "one_group_holds_all": (40, 64, 32, [0, 0, 40, 0], 16, 16),
    "ragged_groups_and_M": (29, 48, 80, [7, 19, 3], 16, 16),  # M, sizes not multiples of 16
    "rows_past_total": (45, 32, 48, [3, 10, 0, 9], 16, None),  # 23 rows past the total
    "all_rows_past_total": (17, 16, 16, [0, 0, 0], None, None),
    "G1": (20, 96, 32, [20], None, 32),
    "G1_with_tail": (37, 32, 16, [10], 32, None),
    "G128": (208, 32, 16, "128", 16, None),
    "wide_tiles_straddled": (100, 64, 64, [33, 1, 30, 35], 64, 32),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, dtype):
    M, K, N, sizes, block_m, block_k = CASES[case]
    rng = np.random.default_rng(M * 31 + N)
    sizes = _sizes_128(rng, M - 8) if sizes == "128" else np.asarray(sizes)
    lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), K, N)) / np.sqrt(K), dtype)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul_pallas(lhs, rhs, group_sizes, block_m=block_m, block_k=block_k,
                                interpret=INTERPRET)
    ref = grouped_matmul_reference(lhs, rhs, group_sizes)
    assert out.shape == (M, N) and out.dtype == dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_array_equal(out[sizes.sum():], 0)  # rows past the total: exactly zero
    # f32: accumulation order only; bf16: the output's rounding (inputs are bf16 in both).
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * max(np.abs(ref).max(), 1))


@pytest.mark.parametrize("case", ["empty_groups", "rows_past_total", "G128"])
def test_reference_matches_ragged_dot(case):
    """The oracle and XLA's ragged_dot agree, zero rows past the total included."""
    M, K, N, sizes, _, _ = CASES[case]
    rng = np.random.default_rng(M)
    sizes = _sizes_128(rng, M - 8) if sizes == "128" else np.asarray(sizes)
    lhs = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), K, N)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    want = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST)
    got = grouped_matmul_reference(lhs, rhs, group_sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M, block_m, sizes", [
    (50, 16, [5, 0, 30, 3]), (64, 16, [16, 16, 16, 16]), (7, 16, [0, 7]),
    (33, 32, [1] * 33), (1000, 64, None)])
def test_schedule_covers_every_row_once(M, block_m, sizes):
    """Each row lies in exactly one entry, of its own group (G = past the total), within one tile,
    and the entries fit the static bound cdiv(M, block_m) + G."""
    rng = np.random.default_rng(M)
    sizes = np.asarray(sizes if sizes is not None else _sizes_128(rng, M - 100))
    group, lo, hi = (np.asarray(a) for a in tile_schedule(jnp.asarray(sizes, jnp.int32), M,
                                                          block_m))
    assert len(group) == -(-M // block_m) + len(sizes)
    row_group = np.repeat(np.arange(len(sizes) + 1), np.append(sizes, M - sizes.sum()))
    covered = np.zeros(M, int)
    for g, a, b in zip(group, lo, hi):
        assert a <= b and (a == b or (a // block_m == (b - 1) // block_m))
        assert np.all(row_group[a:b] == g)
        covered[a:b] += 1
    np.testing.assert_array_equal(covered, 1)


@pytest.mark.parametrize("num_entries, num_n", [(1, 1), (8, 3), (13, 5), (264, 112), (7, 2)])
def test_grid_order_visits_every_program_once(num_entries, num_n):
    pid = jnp.arange(num_entries * num_n, dtype=jnp.int32)
    entry, column = (np.asarray(a) for a in program_tile(pid, num_entries, num_n))
    assert entry.min() >= 0 and entry.max() < num_entries and column.max() < num_n
    assert len(set(zip(entry.tolist(), column.tolist()))) == num_entries * num_n


def test_dispatcher():
    rng = np.random.default_rng(5)
    lhs = jnp.asarray(rng.standard_normal((24, 32)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((3, 32, 16)), jnp.bfloat16)
    sizes = jnp.asarray([4, 0, 15], jnp.int32)
    auto = grouped_matmul(lhs, rhs, sizes)  # CPU: today's path, ragged_dot, bit for bit
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(jax.lax.ragged_dot(lhs, rhs, sizes)))
    ref = np.asarray(grouped_matmul(lhs, rhs, sizes, impl="reference"), np.float32)
    pallas = np.asarray(grouped_matmul(lhs, rhs, sizes, impl="pallas"), np.float32)
    np.testing.assert_allclose(pallas, ref, rtol=8e-3, atol=8e-3 * np.abs(ref).max())
    with pytest.raises(ValueError, match="impl='triton'"):
        grouped_matmul(lhs, rhs, sizes, impl="triton")
    with pytest.raises(ValueError, match=r"group_sizes.shape=\(2,\)"):
        grouped_matmul(lhs, rhs, sizes[:2])
    with pytest.raises(ValueError, match=r"lhs \(24, 32\) and rhs \(3, 16, 16\)"):
        grouped_matmul(lhs, rhs[:, :16], sizes)


def test_tiles_and_shape_errors():
    assert default_tiles(2048, 2048, 768, 128, jnp.bfloat16) == (16, 128, 64)  # Qwen3 decode
    assert default_tiles(512, 4096, 14336, 8, jnp.bfloat16) == (64, 128, 64)  # Mixtral decode
    assert default_tiles(32768, 14336, 4096, 8, jnp.float32) == (128, 128, 32)
    lhs, sizes = jnp.zeros((8, 32), jnp.float32), jnp.asarray([8], jnp.int32)
    with pytest.raises(ValueError, match="K=32 and N=24 must be multiples of 16"):
        grouped_matmul_pallas(lhs, jnp.zeros((1, 32, 24)), sizes, interpret=True)
    with pytest.raises(ValueError, match="block_m=24 must be a power of two"):
        grouped_matmul_pallas(lhs, jnp.zeros((1, 32, 16)), sizes, block_m=24, interpret=True)
    with pytest.raises(ValueError, match="block_k=64 must divide K=32"):
        grouped_matmul_pallas(lhs, jnp.zeros((1, 32, 16)), sizes, block_k=64, interpret=True)


def test_grouped_experts_on_the_kernel():
    """models.moe.grouped_experts with the kernel: all experts, and one shard's experts 2..3
    (the other assignments sort past the total)."""
    E, D, F, T, top_k = 6, 32, 48, 11, 2
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((E, D, F)) / 4, jnp.float32) for _ in "gu")
    w_down = jnp.asarray(rng.standard_normal((E, F, D)) / 4, jnp.float32)
    weights, ids = route(jnp.asarray(rng.standard_normal((T, E))), top_k, normalize=True)
    got = grouped_experts(x, weights, ids, w_gate, w_up, w_down, jnp.int32(0), impl="pallas")
    # f32 in full precision on a GPU too (its default f32 matmul is TF32: ~1e-3 off, seen on the
    # H200; the kernel's own dots already ask for HIGHEST)
    with jax.default_matmul_precision("highest"):
        want = experts_reference(x, weights, ids, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    part = grouped_experts(x, weights, ids, w_gate[2:4], w_up[2:4], w_down[2:4], jnp.int32(2),
                           impl="pallas")
    held = jnp.where((ids >= 2) & (ids < 4), weights, 0.0)
    with jax.default_matmul_precision("highest"):
        want = experts_reference(x, held, ids, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(part), np.asarray(want), rtol=1e-5, atol=1e-5)
