"""GGUF (llama.cpp) quantized blocks -> host QuantizedHost, for quantization="gguf": Q4_0/Q4_1/Q4_K
as int4 values with f32 scales and zeros (device format int4_f32), Q8_0 as int8 values with f16
scales (int8_g32), both in groups of 32 inputs, HF orientation [O, I]. The other ggml types
(Q6_K, Q5_*, F16, ...) are dequantized by gguf.quants and loaded as plain params.

Data path: jaxserve/gguf_checkpoint.py reads each kept tensor through these; weights.py picks
every projection's device format from GGUF_KEPT_TYPES; models/quant.py linear_arrays -> leaves.
"""
from __future__ import annotations

import numpy as np

from models.quant import QuantizedHost

# ggml block layouts (ggml-common.h), 32 (Q4_0, Q4_1) or 256 (Q4_K) inputs per block, little
# endian: Q4_0 {f16 d; u8 qs[16]}: w = d * (q - 8); Q4_1 {f16 d, m; u8 qs[16]}: w = d * q + m;
# in both, q of input i < 16 is qs[i] & 0xF and of input 16 + i is qs[i] >> 4.
# Q4_K {f16 d, dmin; u8 scales[12]; u8 qs[128]}: 8 sub-blocks of 32 with 6-bit sc[j], mn[j]
# (get_scale_min_k4); w = d * sc[j] * q - dmin * mn[j]; sub-block 2c holds the low nibbles of
# qs[32c : 32c + 32], sub-block 2c + 1 their high nibbles.
GGUF_INT4_TYPES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}  # type -> bytes per block
GGUF_GROUP = 32  # inputs per scale/zero in all three, and Q8_0's
GGUF_Q8_BLOCK = 34  # Q8_0 {f16 d; i8 qs[32]}: w = d * q
GGUF_KEPT_TYPES = {**{t: "int4_f32" for t in GGUF_INT4_TYPES}, "Q8_0": "int8_g32"}  # -> format


def gguf_q8_host(data: np.ndarray, in_features: int) -> QuantizedHost:
    """A Q8_0 tensor's raw blocks (u8, O rows of in_features inputs) -> QuantizedHost with values
    i8[O, I] and scales f16[O, I/32], no zeros: w = d * q, exact in f32 (11 x 8 significant bits)
    and so equal to gguf.quants.dequantize bit for bit."""
    blocks = np.ascontiguousarray(data, np.uint8).reshape(-1, GGUF_Q8_BLOCK)
    rows = blocks.shape[0] * GGUF_GROUP // in_features
    return QuantizedHost(values=blocks[:, 2:].view(np.int8).reshape(rows, in_features),
                         scales=blocks[:, :2].view(np.float16).reshape(rows, -1))


def gguf_kept_host(data: np.ndarray, type_name: str, in_features: int) -> QuantizedHost:
    """Any GGUF_KEPT_TYPES tensor -> its QuantizedHost (gguf_q8_host or gguf_int4_host)."""
    if type_name == "Q8_0":
        return gguf_q8_host(data, in_features)
    return gguf_int4_host(data, type_name, in_features)


def gguf_int4_host(data: np.ndarray, type_name: str, in_features: int) -> QuantizedHost:
    """A GGUF tensor's raw blocks (u8, O rows of in_features inputs, HF orientation) ->
    QuantizedHost with values u8[O, I], f32 scales and zeros [O, I/32]: w = s * q + c per group
    of 32 becomes (q - z) * s with z = -c / s (z = 8 exactly for Q4_0). A group with s == 0
    (w = c everywhere) is stored as q = 0, scale c, zero -1, so it stays exact too."""
    if type_name not in GGUF_INT4_TYPES:
        raise ValueError(f"{type_name=} is not an int4 GGUF type; int4: {list(GGUF_INT4_TYPES)}")
    blocks = np.ascontiguousarray(data, np.uint8).reshape(-1, GGUF_INT4_TYPES[type_name])
    rows = blocks.shape[0] * (256 if type_name == "Q4_K" else 32) // in_features
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)  # [n, 1]
    if type_name == "Q4_K":
        q = _nibbles(blocks[:, 16:].reshape(-1, 4, 1, 32)).reshape(-1, 8, 32)
        sc, mn = _q4k_scale_min(blocks[:, 4:16])  # [n, 8] each
        s = d * sc.astype(np.float32)  # exact: 11 x 6 significant bits
        c = -(blocks[:, 2:4].view(np.float16).astype(np.float32) * mn.astype(np.float32))
    else:
        q = _nibbles(blocks[:, -16:].reshape(-1, 1, 16)).reshape(-1, 1, 32)
        s = d
        c = (blocks[:, 2:4].view(np.float16).astype(np.float32) if type_name == "Q4_1"
             else -8.0 * d)
    flat = s == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(flat, -1.0, -c / np.where(flat, 1.0, s)).astype(np.float32)
    q = np.where(flat[..., None], 0, q).astype(np.uint8)
    return QuantizedHost(values=q.reshape(rows, in_features),
                         scales=np.where(flat, c, s).astype(np.float32).reshape(rows, -1),
                         zeros=z.reshape(rows, -1))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """u8[..., 1, k] -> u8[..., 2, k]: low nibbles (the first k inputs), then high nibbles."""
    return (qs >> np.array([0, 4], np.uint8).reshape(2, 1)) & np.uint8(0xF)


def _q4k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """u8[n, 12] -> (sc, mn) u8[n, 8]: ggml's get_scale_min_k4. Sub-blocks 0..3 are the low 6
    bits of bytes 0..3 (sc) and 4..7 (mn); 4..7 take their low 4 bits from bytes 8..11 (sc: low
    nibble, mn: high nibble) and their top 2 bits from the top of bytes 0..3 (sc) and 4..7 (mn)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn
