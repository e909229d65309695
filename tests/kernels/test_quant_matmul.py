"""int4 matmul (kernels_pallas/quant_matmul): the Pallas kernel against the f32 reference on awkward
decode shapes, the reference's dequantization against plain numpy, and the dispatcher.

On CPU the kernel runs in interpret mode (INTERPRET=True); with JAXSERVE_TEST_GPU=1 on a GPU the
same tests run it compiled (Triton lowering).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.quant_matmul import int4_matmul
from kernels_pallas.quant_matmul.kernel import default_tiles, int4_matmul_pallas
from kernels_pallas.quant_matmul.reference import dequantize_int4, int4_matmul_reference
from models.quant import pack_int4

INTERPRET = jax.default_backend() != "gpu"


def _case(rng, M, I, O, g, dtype=jnp.bfloat16):
    q = rng.integers(0, 16, (I, O)).astype(np.uint8)
    zeros = rng.integers(0, 16, (I // g, O)).astype(np.float16)
    scales = (0.005 + 0.02 * rng.random((I // g, O))).astype(np.float16)
    x = jnp.asarray(rng.standard_normal((M, I)), dtype)
    return x, q, jnp.asarray(pack_int4(q, g)), jnp.asarray(scales), jnp.asarray(zeros)


def _numpy_dequant(q, scales, zeros, g):  # the obvious formula, per element
    return ((q.astype(np.float32) - np.repeat(np.asarray(zeros, np.float32), g, axis=0))
            * np.repeat(np.asarray(scales, np.float32), g, axis=0))


@pytest.mark.parametrize("I, O, g", [(128, 16, 128), (384, 48, 128), (512, 96, 256)])
def test_dequantize_equals_numpy(I, O, g):
    x, q, packed, scales, zeros = _case(np.random.default_rng(I + O), 1, I, O, g)
    got = np.asarray(dequantize_int4(packed, scales, zeros, group_size=g))
    np.testing.assert_array_equal(got, _numpy_dequant(q, scales, zeros, g))


# (M, I, O, g, block_n, num_splits): odd M (padded to a power of two >= 16 inside), O not a
# power of two, several groups per split, one group per split, a single program column.
SHAPES = [(1, 128, 16, 128, None, None), (3, 384, 48, 128, None, None),
          (5, 640, 96, 128, 32, 5), (17, 512, 80, 128, 16, 2), (8, 1024, 256, 256, 64, 1),
          (33, 256, 32, 128, None, None), (64, 256, 128, 128, 128, 2)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("M, I, O, g, block_n, num_splits", SHAPES)
def test_kernel_matches_reference(M, I, O, g, block_n, num_splits, dtype):
    x, q, packed, scales, zeros = _case(np.random.default_rng(M * 7 + O), M, I, O, g, dtype)
    out = int4_matmul_pallas(x, packed, scales, zeros, group_size=g, block_n=block_n,
                             num_splits=num_splits, interpret=INTERPRET)
    ref = int4_matmul_reference(x, packed, scales, zeros, group_size=g)
    assert out.shape == (M, O) and out.dtype == x.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    # f32: accumulation order only; bf16: the output's rounding (x is bf16 in both).
    tol = 1e-5 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_reference_is_x_times_numpy_dequant():
    x, q, packed, scales, zeros = _case(np.random.default_rng(1), 4, 256, 32, 128, jnp.float32)
    want = np.asarray(x) @ _numpy_dequant(q, scales, zeros, 128)
    got = np.asarray(int4_matmul_reference(x, packed, scales, zeros, group_size=128))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dispatcher_xla_path_and_bad_impl():
    x, q, packed, scales, zeros = _case(np.random.default_rng(2), 100, 256, 64, 128, jnp.float32)
    ref = int4_matmul_reference(x, packed, scales, zeros, group_size=128)
    got = int4_matmul(x, packed, scales, zeros, group_size=128)  # prefill-shaped: xla
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="impl='triton'"):
        int4_matmul(x, packed, scales, zeros, group_size=128, impl="triton")


def test_tiles_and_shape_errors():
    assert default_tiles(4096, 32) == (128, 16)  # 32 columns x 16 splits = 512 programs
    assert default_tiles(48, 3) == (16, 3)
    x, q, packed, scales, zeros = _case(np.random.default_rng(3), 2, 256, 24, 128)
    with pytest.raises(ValueError, match="out_features=24 must be a multiple of 16"):
        int4_matmul_pallas(x, packed, scales, zeros, group_size=128, interpret=True)
    x, q, packed, scales, zeros = _case(np.random.default_rng(3), 2, 256, 32, 128)
    with pytest.raises(ValueError, match="group_size=64 must be a multiple of 128"):
        int4_matmul_pallas(x, packed, scales, zeros, group_size=64, interpret=True)
    with pytest.raises(ValueError, match="block_n=48 must divide out_features=32 and be a power"):
        int4_matmul_pallas(x, packed, scales, zeros, group_size=128, block_n=48, interpret=True)
    with pytest.raises(ValueError, match="num_splits=3 must divide the 2 groups"):
        int4_matmul_pallas(x, packed, scales, zeros, group_size=128, num_splits=3,
                           interpret=True)
