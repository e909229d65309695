"""quantization="gguf" on Q8_0 (llama.cpp's 8-bit export): each Q8_0 projection kept int8 on device
(int8_g32: i8 [I, O] + f16 scales per 32 inputs, models/gguf_quant.py gguf_q8_host).

(1) the block conversion equals gguf's own numpy dequantizer bit for bit, on the host and after
the device layout; (2) a tiny Llama GGUF whose projections are all Q8_0 loads every one as int8,
dequantizing exactly to the expanded load's params, logs its int8 bytes, and gives the expanded
model's logits. Q4 + Q8_0 mixed in one file, and tensor parallelism: tests/models/test_gguf_quant.py.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import Driver
from test_gguf_quant import HF_NAMES, needs_smollm2, random_blocks, reference, write_mixed_gguf

from jaxserve.checkpoint import embedded_gguf_path
from models.gguf_quant import gguf_kept_host, gguf_q8_host
from models.linear import dequantize_int8, int8_matmul
from models.quant import QuantMethod, linear_arrays

gguf = pytest.importorskip("gguf")
Q8_LAYERS = [dict.fromkeys(HF_NAMES, "Q8_0")] * 2


def test_q8_conversion_matches_gguf_dequantize():
    """Q8_0's w = d * q is exact in f32 (8 x 11 significant bits): the host dequantization, the
    device leaves (linear_arrays, our [I, O] layout) and their device dequantization all equal
    gguf.quants.dequantize exactly, zero scales included (random_blocks zeroes every 7th)."""
    rng = np.random.default_rng(8)
    rows, cols = 6, 512
    blocks = random_blocks("Q8_0", rows, cols, rng)
    want = reference(blocks, "Q8_0", cols)
    host = gguf_kept_host(blocks, "Q8_0", cols)
    assert host.values.dtype == np.int8 and host.values.shape == (rows, cols)
    assert host.scales.dtype == np.float16 and host.zeros is None and host.group_size == 32
    np.testing.assert_array_equal(host.dequantize(), want)
    leaves = linear_arrays(host, lambda w, cfg: w.T, None, QuantMethod("gguf", group_size=32),
                           (cols, rows))
    assert {k: (v.shape, v.dtype) for k, v in leaves.items()} == {
        "qweight": ((cols, rows), np.int8), "qscale": ((cols // 32, rows), np.float16)}
    device = dequantize_int8(leaves["qweight"], leaves["qscale"], group_size=32)
    np.testing.assert_array_equal(np.asarray(device), want.T)


def test_int8_matmul_matches_f32_matmul():
    """int8_matmul (dequantize to x's dtype, one matmul) against numpy's f64 x @ w (f32: 1e-5)."""
    rng = np.random.default_rng(1)
    host = gguf_q8_host(random_blocks("Q8_0", 64, 256, rng), 256)  # [O, I]
    x = rng.standard_normal((5, 256)).astype(np.float32)
    want = x.astype(np.float64) @ host.dequantize().T.astype(np.float64)
    got = int8_matmul(jnp.asarray(x), jnp.asarray(host.values.T),
                      jnp.asarray(host.scales.T), group_size=32)
    assert got.dtype == jnp.float32 and got.shape == (5, 64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """(expanded load, gguf-quantized load, start-up log) of a tiny all-Q8_0 Llama, float32."""
    from jaxserve.startup import log_weight_bytes
    from jaxserve.weights import load_model

    path = write_mixed_gguf(str(tmp_path_factory.mktemp("gguf") / "q8.gguf"), Q8_LAYERS)
    kw = dict(tokenizer=embedded_gguf_path(), dtype="float32")
    return load_model(path, **kw), load_model(path, quantization="gguf", **kw), log_weight_bytes


@needs_smollm2
def test_q8_file_keeps_every_projection_int8(q8, caplog):
    """All 14 projections are int8_g32 leaves that dequantize exactly to the expanded load's
    params (llama.cpp's q/k row permutation undone on values and scales alike); no int4 leaf and
    no f32 projection left; the start-up memory log names the int8 bytes (1 byte per weight)."""
    expanded, quantized, log_weight_bytes = q8
    assert quantized.config.quantization == "gguf"
    int8_bytes = 0
    for layer in range(len(Q8_LAYERS)):
        for name in HF_NAMES.values():
            block = "attn" if name.startswith("self_attn") else "mlp"
            proj = name.split(".")[1]
            module = getattr(getattr(quantized.state["layers"][layer], block), proj)
            qweight, qscale = module["qweight"].get_value(), module["qscale"].get_value()
            assert qweight.dtype == np.int8 and qscale.dtype == np.float16, (layer, name)
            assert "qzero" not in module
            want = np.asarray(getattr(getattr(expanded.state["layers"][layer], block),
                                      proj).get_value())
            got = dequantize_int8(qweight, qscale, group_size=32)
            np.testing.assert_array_equal(np.asarray(got), want.reshape(got.shape), f"{name}")
            int8_bytes += qweight.nbytes
    leaves = jax.tree.leaves(quantized.state)
    assert not [leaf for leaf in leaves if leaf.dtype == np.int32]
    assert sum(leaf.nbytes for leaf in leaves if leaf.dtype == np.int8) == int8_bytes
    with caplog.at_level(logging.INFO, logger="jaxserve"):
        log_weight_bytes(quantized.state, quantized.config)
    assert f"int8 {int8_bytes / 2**30:.3f} GiB" in caplog.text
    assert "quantization=gguf" in caplog.text


@needs_smollm2
def test_q8_file_logits_match_expanded(q8):
    """Prefill logits of the int8 model vs the expanded one: the weights are equal, so only the
    matmuls' f32 summation order differs (bound 1e-4 of the logits' scale)."""
    expanded, quantized, _ = q8
    ids = [list(range(3, 40)), [5, 9, 1]]
    for want, got in zip(Driver(expanded, 2).step(ids), Driver(quantized, 2).step(ids)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_gguf_without_kept_types_is_an_error(tmp_path):
    """quantization='gguf' on a file with no Q4/Q8_0 tensor (here Q6_K and F16) says so."""
    from jaxserve.weights import load_model

    layers = [dict.fromkeys(HF_NAMES, "Q6_K"), dict.fromkeys(HF_NAMES, "F16")]
    path = write_mixed_gguf(str(tmp_path / "q6.gguf"), layers)
    with pytest.raises(ValueError, match=r"has no Q4_0/Q4_1/Q4_K/Q8_0 tensors \(types \['F16', "
                                         r"'F32', 'Q6_K'\]\)"):
        load_model(path, quantization="gguf")
