"""apply_rope (the fused form: halves swapped by an index reversal, no concatenate of the rotated
halves) equals the textbook rotate-half formula in f32 and bf16, with an attention
factor (YaRN) and partial rotary (Phi-4-mini)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from models.layers import apply_rope


def textbook(x, positions, inv_freq, attn_factor=1.0):
    rotary = 2 * len(inv_freq)
    angles = np.asarray(positions, np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None]
    cos = (np.cos(angles) * attn_factor)[:, None, :]
    sin = (np.sin(angles) * attn_factor)[:, None, :]
    xf = np.asarray(x, np.float32)
    x1, x2, rest = xf[..., :rotary // 2], xf[..., rotary // 2:rotary], xf[..., rotary:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads, head_dim, rotary, factor", [
    (3, 64, 64, 1.0), (5, 128, 128, 1.3), (2, 96, 64, 1.0)])
def test_matches_rotate_half(dtype, heads, head_dim, rotary, factor):
    rng = np.random.default_rng(heads)
    x = jnp.asarray(rng.standard_normal((7, heads, head_dim)), dtype)
    positions = jnp.asarray(rng.integers(0, 40_000, 7), jnp.int32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, rotary, 2) / rotary)).astype(np.float32)
    got = np.asarray(apply_rope(x, positions, inv_freq, factor).astype(jnp.float32))
    want = textbook(x.astype(jnp.float32), positions, inv_freq, factor)
    want = np.asarray(jnp.asarray(want).astype(dtype).astype(jnp.float32))
    # f32: numpy's and XLA's cos/sin may differ in the last ulp; bf16: that can flip one rounding
    tol = dict(rtol=0, atol=2e-6) if dtype == jnp.float32 else dict(rtol=2.0**-7, atol=1e-6)
    np.testing.assert_allclose(got, want, **tol)
