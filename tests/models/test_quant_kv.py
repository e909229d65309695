"""fp8 KV cache (--kv-cache-dtype fp8): e4m3 pages with scale 1.0 written by write_kv (saturating)
and read by the reference attention, the start-up helpers that pick the dtype and attention impl,
and the page bytes the pool is sized by. The engine-level check on the real SmolLM2 is in
test_quant_smollm2.py."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.kv_cache import kv_cache_bytes_per_page, write_kv
from jaxserve.startup import attention_impl_for, kv_cache_dtype
from kernels_pallas.ragged_paged_attention.reference import ragged_paged_attention_reference
from tests.kernels.cases import make_case

E4M3 = jnp.float8_e4m3fn


def test_write_kv_rounds_and_saturates():
    pages = jnp.zeros((3, 4, 1, 2), E4M3)
    new = jnp.asarray([[[0.3, -1000.0]], [[500.0, 1.0625]]], jnp.bfloat16)  # [T=2, K=1, H=2]
    out = write_kv(pages, new, jnp.asarray([5, 12], jnp.int32))  # slot 12 = num_slots: dropped
    assert out.dtype == E4M3
    flat = np.asarray(out.astype(jnp.float32)).reshape(-1, 2)
    np.testing.assert_array_equal(flat[5], [0.3125, -448.0])  # e4m3 nearest; -1000 saturates
    assert not np.any(np.delete(flat, 5, axis=0))


def test_reference_attention_reads_e4m3_pages():
    """Attention over e4m3 pages equals attention over f32 pages holding the same rounded values,
    and stays within e4m3's rounding of the unrounded f32 result."""
    inputs = make_case(np.random.default_rng(0), q_lens=[1, 5, 1], kv_lens=[9, 5, 40],
                       num_q_heads=4, num_kv_heads=2, head_dim=32, page_size=8,
                       dtype=jnp.float32)
    kw = dict(sm_scale=32 ** -0.5)
    fp8 = {**inputs, "k_pages": inputs["k_pages"].astype(E4M3),
           "v_pages": inputs["v_pages"].astype(E4M3)}
    rounded = {**inputs, "k_pages": fp8["k_pages"].astype(jnp.float32),
               "v_pages": fp8["v_pages"].astype(jnp.float32)}
    got = np.asarray(ragged_paged_attention_reference(**fp8, **kw))
    np.testing.assert_allclose(got, np.asarray(ragged_paged_attention_reference(**rounded, **kw)),
                               rtol=1e-6, atol=1e-6)
    exact = np.asarray(ragged_paged_attention_reference(**inputs, **kw))
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.05


def test_kv_cache_dtype_and_attention_impl():
    assert kv_cache_dtype("auto", jnp.bfloat16) == jnp.bfloat16
    assert kv_cache_dtype("fp8", jnp.bfloat16) == kv_cache_dtype("fp8_e4m3", jnp.float32) == E4M3
    assert attention_impl_for("auto", E4M3) == "reference"
    assert attention_impl_for("auto", jnp.float32) == "reference"  # CPU: no kernel anyway
    half = kv_cache_bytes_per_page(2, 16, 2, 64, E4M3) * 2
    assert half == kv_cache_bytes_per_page(2, 16, 2, 64, jnp.bfloat16)  # twice the tokens fit
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e5m2' is not supported"):
        EngineConfig(kv_cache_dtype="fp8_e5m2")
    assert EngineConfig(kv_cache_dtype="fp8", quantization="fp8").quantization == "fp8"
