"""Ragged paged attention kernels (GPU Mosaic, TPU Mosaic) against the plain-jnp reference.

On CPU both kernels run in interpret mode (INTERPRET=True): the GPU kernel through Mosaic GPU's
interpreter (InterpretGPUParams), the TPU kernel through pltpu.InterpretParams. With
JAXSERVE_TEST_GPU=1 on a GPU machine the GPU tests re-run compiled (INTERPRET=False) and the TPU
tests are skipped.
"""
from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.ragged_paged_attention import ragged_paged_attention
from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_gpu
from kernels_pallas.ragged_paged_attention.reference import ragged_paged_attention_reference
from tests.kernels.cases import make_case

INTERPRET = jax.default_backend() != "gpu"
TOL = {jnp.bfloat16: 1e-2, jnp.float32: 1e-4}  # ||out - ref|| / ||ref||

# name: (make_case kwargs, sliding_window, soft_cap)
CASES = {
    "decode_ragged_lens": (dict(q_lens=[1] * 5, kv_lens=[1, 3, 17, 513, 1023], num_q_heads=2,
                                num_kv_heads=2, head_dim=64, page_size=16), None, None),
    "mixed_gqa9_3_pad": (dict(q_lens=[7, 1, 33, 1], kv_lens=[7, 17, 40, 513], num_q_heads=9,
                              num_kv_heads=3, head_dim=128, page_size=16, num_pad_seqs=2,
                              extra_tokens=3), None, None),
    "llama_gqa32_8_page64": (dict(q_lens=[1, 20, 1], kv_lens=[1023, 20, 3], num_q_heads=32,
                                  num_kv_heads=8, head_dim=128, page_size=64), None, None),
    "mqa8_1_window_page128": (dict(q_lens=[5, 1, 70], kv_lens=[100, 513, 300], num_q_heads=8,
                                   num_kv_heads=1, head_dim=64, page_size=128), 32, None),
    "mha4_4_softcap": (dict(q_lens=[3, 1, 17], kv_lens=[3, 64, 81], num_q_heads=4, num_kv_heads=4,
                            head_dim=128, page_size=32), None, 5.0),
    "window_softcap_chunk": (dict(q_lens=[40, 1], kv_lens=[513, 17], num_q_heads=6, num_kv_heads=2,
                                  head_dim=64, page_size=16, num_pad_seqs=1), 100, 20.0),
    "bucket_padding": (dict(q_lens=[1, 9, 1], kv_lens=[30, 9, 200], num_q_heads=8,
                            num_kv_heads=2, head_dim=64, page_size=16, num_pad_seqs=2,
                            extra_tokens=53), None, None),  # zero-filled by several idle items
}
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def _check(fn, name, dtype, seed):
    kw, window, cap = CASES[name]
    inputs = make_case(np.random.default_rng(seed), dtype=DTYPES[dtype], **kw)
    sm_scale = kw["head_dim"] ** -0.5
    out = fn(**inputs, sm_scale=sm_scale, sliding_window=window, soft_cap=cap)
    ref = ragged_paged_attention_reference(**jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype
                                                          == DTYPES[dtype] else x, inputs),
                                           sm_scale=sm_scale, sliding_window=window, soft_cap=cap)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert np.isfinite(out).all()
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert err < TOL[DTYPES[dtype]], f"{name} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernel(name, dtype):
    if dtype == "f32" and name not in ("mixed_gqa9_3_pad", "window_softcap_chunk"):
        pytest.skip("f32 on GPU takes the reference fallback: two cases suffice")
    fn = functools.partial(ragged_paged_attention_gpu, interpret=INTERPRET)
    _check(fn, name, dtype, seed=zlib.crc32(name.encode()))


@pytest.mark.parametrize("name", list(CASES))
def test_gpu_kernel_warp_specialized(name):
    """The FA3-style kernel (two compute warpgroups + a TMA producer) on every case: decode items
    leave the second warpgroup only draining the ring; long chunks make the two warpgroups'
    causal ends differ."""
    from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_mosaic
    fn = functools.partial(ragged_paged_attention_mosaic, interpret=INTERPRET,
                           warp_specialized=True)
    _check(fn, name, "bf16", seed=zlib.crc32(name.encode()) + 2)


def test_gpu_kernel_choice_by_shape():
    """Prefill-shaped steps that fill the GPU take the warp-specialized kernel; decode-shaped
    (tokens == sequence rows) and small ones the one-warpgroup kernel."""
    from kernels_pallas.ragged_paged_attention.kernel_gpu import _use_ws
    assert _use_ws(T=4096, B=1, K=8, G=4)
    assert not _use_ws(T=256, B=256, K=8, G=4)
    assert not _use_ws(T=64, B=8, K=2, G=4)


@pytest.mark.skipif(not INTERPRET, reason="TPU kernel: interpret mode on CPU only")
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_tpu_kernel(name, dtype):
    from kernels_pallas.ragged_paged_attention.kernel_tpu import ragged_paged_attention_tpu
    fn = functools.partial(ragged_paged_attention_tpu, interpret=INTERPRET)
    _check(fn, name, dtype, seed=zlib.crc32(name.encode()) + 1)


def test_dispatch_reference_matches():
    kw, _, _ = CASES["mixed_gqa9_3_pad"]
    inputs = make_case(np.random.default_rng(0), **kw)
    a = ragged_paged_attention(**inputs, sm_scale=0.1, impl="reference")
    b = ragged_paged_attention_reference(**inputs, sm_scale=0.1)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_gpu_kernel_splits_big_pages():
    """page_size 128 > block_kv 64: the wrapper views each page as two."""
    from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_mosaic
    fn = functools.partial(ragged_paged_attention_mosaic, interpret=INTERPRET, block_kv=64,
                           num_stages=2)
    _check(fn, "mqa8_1_window_page128", "bf16", seed=7)


@pytest.mark.parametrize("splits", [1, 3])
def test_gpu_kernel_kv_splits(splits):
    """Several CTAs per (work item, kv head), merged by log-sum-exp; and none."""
    from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_mosaic
    fn = functools.partial(ragged_paged_attention_mosaic, interpret=INTERPRET,
                           num_kv_splits=splits)
    _check(fn, "window_softcap_chunk" if splits == 1 else "decode_ragged_lens", "bf16", seed=11)


def test_gpu_kernel_early_k_refill():
    """K slots refilled right after QK^T (V after PV): a different barrier schedule."""
    from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_mosaic
    fn = functools.partial(ragged_paged_attention_mosaic, interpret=INTERPRET, early_k_refill=True)
    _check(fn, "llama_gqa32_8_page64", "bf16", seed=5)


@pytest.mark.parametrize("tpb", [1, 5, 16, 32])
def test_work_table_covers_every_token_once(tpb):
    """Active items cover each live sequence's tokens once; idle items cover the tokens of no live
    sequence once (the kernels zero them there), however many there are."""
    from kernels_pallas.ragged_paged_attention import schedule as sch
    rng = np.random.default_rng(tpb)
    for _ in range(20):
        B = int(rng.integers(1, 6))
        live = int(rng.integers(0, B + 1))
        q_lens = rng.integers(0, 40, B) * (np.arange(B) < live)
        T = int(q_lens.sum() + rng.integers(0, 100))
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        kv = q_lens + rng.integers(0, 50, B)
        work = np.asarray(sch.build_work_table(
            jnp.asarray(kv, jnp.int32), jnp.asarray(cu), jnp.asarray([live], jnp.int32),
            num_tokens=T, tokens_per_block=tpb, block_kv=64, sliding_window=None))
        seen = np.zeros(T, int)
        for row in work:
            n = row[sch.NTOK] or row[sch.ZERO_NTOK]
            seen[row[sch.TOK0]:row[sch.TOK0] + n] += 1
        np.testing.assert_array_equal(seen, np.ones(T, int))
