"""Quantized weight formats between the checkpoint and the device: which method a checkpoint uses
(config.json `quantization_config`), its tensors read as one host QuantizedHost per projection (HF
orientation [out, in]), quantize-at-load (fp8), and the device layouts models/linear.py holds.

Data path: checkpoint.py wraps a quantized checkpoint's tensors (wrap_quantized_tensors), weights.py
turns each QuantizedHost or float tensor into a QuantLinear's leaves (linear_arrays). GGUF's
blocks become QuantizedHosts in models/gguf_quant.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
METHODS = ("fp8", "awq", "gptq", "gguf")  # --quantization values implemented (vLLM's names)
# Leaves of a QuantLinear (models/linear.py); weights.py groups params by them.
QUANT_LEAVES = ("qweight", "qscale", "qzero")
INT4_PACK = 8  # nibbles per int32


@dataclass(frozen=True)
class QuantMethod:
    """How a model's projections are stored: `name` is the --quantization value; `weight_format`
    the device layout ("fp8": e4m3 [O, I] + f32[O]; "int4": packed + f16 group scales/zeros),
    or "gguf": one format per projection, its tensor's (models/gguf_quant.py GGUF_KEPT_TYPES:
    "int4_f32", the int4 packing with f32 scales/zeros, for Q4 blocks; "int8_g32", i8 [I, O]
    + f16 scales per 32 inputs, for Q8_0), chosen at load (weights.py)."""

    name: str  # "fp8" | "awq" | "gptq" | "gguf"
    group_size: int = 128  # int4: input rows per scale/zero
    gptq_zero_offset: int = 0  # GPTQ v1 checkpoints store zero - 1

    @property
    def weight_format(self) -> str:
        return {"fp8": "fp8", "gguf": "gguf"}.get(self.name, "int4")


def method_from_hf(hf: dict, requested: str | None) -> QuantMethod | None:
    """The checkpoint's quantization_config (None when absent) reconciled with --quantization.

    A bf16 checkpoint with requested="fp8" is quantized at load (vLLM's behaviour); requested
    "awq"/"gptq" need a checkpoint of that method; any mismatch or unknown value is a ValueError.
    """
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization={requested!r} is not supported; supported: {METHODS}")
    if requested == "gguf":  # GGUF files are read by weights.py before this (no config.json)
        raise ValueError("quantization='gguf' needs a .gguf checkpoint (Q4_0/Q4_1/Q4_K tensors "
                         "kept int4); this model is not a GGUF file (a config.json + "
                         "safetensors directory, or a dummy preset)")
    quant = hf.get("quantization_config") or hf.get("compression_config")
    found = _parse_quantization_config(quant) if quant else None
    if found is None:
        if requested in ("awq", "gptq"):
            raise ValueError(f"quantization={requested!r} needs a {requested} checkpoint (packed "
                             f"int4 qweight/qzeros/scales and quantization_config in config.json)"
                             f"; this one has no quantization_config")
        return QuantMethod("fp8") if requested == "fp8" else None
    if requested is not None and requested != found.name:
        raise ValueError(f"quantization={requested!r} does not match the checkpoint's "
                         f"quantization_config (method {found.name!r})")
    return found


def check_fp8_devices(devices) -> None:
    """fp8 matmuls need FP8 tensor cores on NVIDIA GPUs (compute capability >= 8.9: Ada,
    Hopper); CPU runs them emulated (tests). Other GPUs: a ValueError at start-up, not a slow
    or failing first step."""
    for d in devices:
        cc = getattr(d, "compute_capability", None)
        if d.platform == "gpu" and cc is not None and tuple(map(int, cc.split("."))) < (8, 9):
            raise ValueError(f"quantization='fp8' needs FP8 tensor cores (compute capability "
                             f">= 8.9); {d.device_kind} has {cc}")


def _parse_quantization_config(q: dict) -> QuantMethod:
    method = str(q.get("quant_method") or q.get("format") or "unknown").lower()
    if method == "fp8":  # vLLM / AutoFP8: per-tensor (or per-channel) weight_scale
        if q.get("weight_block_size"):
            raise ValueError(f"fp8 with weight_block_size={q['weight_block_size']} (block-wise "
                             f"scales) is not supported; per-tensor and per-channel are")
        return QuantMethod("fp8")
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    if method in ("awq", "gptq"):
        bits, group = q.get("bits", q.get("w_bit")), q.get("group_size", q.get("q_group_size"))
        if bits != 4:
            raise ValueError(f"{method} with bits={bits} is not supported; only 4-bit")
        if group not in (32, 64, 128, 256):
            raise ValueError(f"{method} with group_size={group} is not supported; 32..256")
        if method == "awq" and (q.get("zero_point") is False
                                or str(q.get("version", "gemm")).lower() != "gemm"):
            raise ValueError(f"awq version={q.get('version')!r} zero_point="
                             f"{q.get('zero_point')} is not supported; GEMM with zero points")
        if method == "gptq" and q.get("desc_act"):
            raise ValueError("gptq with desc_act=True (act-order g_idx) is not supported")
        v2 = q.get("checkpoint_format") == "gptq_v2"
        return QuantMethod(method, group_size=group, gptq_zero_offset=int(method == "gptq"
                                                                          and not v2))
    raise ValueError(f"quantization method {method!r} is not supported; supported: {METHODS} "
                     f"and compressed-tensors fp8")


def _compressed_tensors(q: dict) -> QuantMethod:
    """llm-compressor's FP8 (float-quantized, 8-bit float weights per channel or tensor); other
    compressed-tensors schemes (pack-quantized int4, sparsity) are refused by name."""
    fmt = q.get("format")
    groups = list((q.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    fp8 = weights and all(w.get("num_bits") == 8 and w.get("type") == "float"
                          and w.get("strategy") in ("channel", "tensor") for w in weights)
    if fmt not in ("float-quantized", "naive-quantized") or not fp8:
        raise ValueError(f"compressed-tensors format={fmt!r} with weights {weights[:1]} is not "
                         f"supported; FP8 (float-quantized, channel or tensor scales) is")
    return QuantMethod("fp8")


@dataclass
class QuantizedHost:
    """One projection's checkpoint tensors, host-side, HF orientation [O, I] (O out, I in).

    fp8: values e4m3 [O, I], scales f32[O, 1]; int4: values u8[O, I] in 0..15, scales f32[O, G],
    zeros [O, G]: int in 0..16 for AWQ/GPTQ (GPTQ v1 can read 16), f32 for GGUF (gguf_int4_host),
    G = I / group_size; int8 (GGUF Q8_0, gguf_q8_host): values i8[O, I], scales f16[O, G], no zeros.
    w = (values - zeros) * scales, per group of inputs.
    """

    values: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None = None

    @property
    def group_size(self) -> int:
        return self.values.shape[1] // self.scales.shape[1]

    def dequantize(self) -> np.ndarray:  # f32[O, I]
        g = self.group_size
        v = self.values.astype(np.float32)
        if self.zeros is not None:
            v = v - np.repeat(self.zeros.astype(np.float32), g, axis=1)
        return v * np.repeat(self.scales.astype(np.float32), g, axis=1)


def quantize_fp8(w: np.ndarray) -> QuantizedHost:
    """f32[O, I] -> e4m3 per output channel: scale = amax(|row|) / 448 (vLLM's channel scheme),
    values rounded to nearest, ties to even. In numpy: XLA's divisions are not correctly rounded
    (a w / scale that is an exact tie, common on GGUF-grid weights, then rounds the other way),
    and moving only the amax and the cast to the device gained little here.
    TODO(quant): ~0.8 s per 14336 x 4096 weight on the 2-core dev machine (about 2 min for an
    8B model at load); parallelize across tensors if it matters on the GPU host."""
    w = np.asarray(w, np.float32)
    scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / FP8_MAX
    values = np.clip(w / scale, -FP8_MAX, FP8_MAX).astype(FP8)
    return QuantizedHost(values=values, scales=scale.astype(np.float32))


# ---------------------------------------------------------------- checkpoint tensors -> hosts
def wrap_quantized_tensors(tensors: dict[str, Callable], method: QuantMethod) -> dict:
    """Replace each quantized projection's tensors by one lazy `<prefix>.weight` returning a
    QuantizedHost: fp8 `weight` + `weight_scale` (+ ignored `input_scale`: activations are scaled
    per token); AWQ/GPTQ `qweight` + `qzeros` + `scales` (+ `g_idx`, checked sequential)."""
    out = dict(tensors)
    if method.weight_format == "fp8":
        for name in [n for n in tensors if n.endswith(".weight_scale")]:
            prefix = name.removesuffix(".weight_scale")
            out[prefix + ".weight"] = functools.partial(
                _fp8_host, tensors[prefix + ".weight"], tensors[name])
            del out[name]
            out.pop(prefix + ".input_scale", None)
        return out
    read = {"awq": _awq_host, "gptq": functools.partial(_gptq_host, method=method)}[method.name]
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name.removesuffix(".qweight")
        parts = {k: out.pop(f"{prefix}.{k}") for k in ("qweight", "qzeros", "scales")}
        g_idx = out.pop(prefix + ".g_idx", None)
        out[prefix + ".weight"] = functools.partial(read, parts, g_idx, method.group_size)
    return out


def _fp8_host(weight: Callable, scale: Callable) -> QuantizedHost:
    w = weight()
    if w.dtype != FP8:
        raise ValueError(f"fp8 weight stored as {w.dtype}, expected F8_E4M3")
    s = np.asarray(scale(), np.float32).reshape(-1, 1)  # [O, 1] per channel or [1, 1] per tensor
    return QuantizedHost(values=w, scales=np.broadcast_to(s, (w.shape[0], 1)).copy())


def unpack_int4(packed: np.ndarray, axis: int, order: tuple[int, ...] = tuple(range(8))
                ) -> np.ndarray:
    """int32 words -> u8 nibbles, 8 per word along `axis`; element j of each 8 sits at nibble
    order[j] (sequential for GPTQ, (0, 4, 1, 5, 2, 6, 3, 7) for AWQ's interleave)."""
    words = np.asarray(packed).view(np.uint32)
    nibbles = [(words >> np.uint32(4 * order[j])) & 0xF for j in range(INT4_PACK)]
    out = np.stack(nibbles, axis=axis + 1).astype(np.uint8)  # [..., n, 8, ...]
    shape = list(words.shape)
    shape[axis] *= INT4_PACK
    return out.reshape(shape)


AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output column j of 8 -> nibble AWQ_ORDER[j]


def _awq_host(parts: dict, g_idx, group_size: int) -> QuantizedHost:
    """AutoAWQ GEMM: qweight i32[I, O/8] and qzeros i32[G, O/8] packed along O in AWQ's order,
    scales f16[G, O]."""
    q = unpack_int4(parts["qweight"](), axis=1, order=AWQ_ORDER)  # [I, O]
    z = unpack_int4(parts["qzeros"](), axis=1, order=AWQ_ORDER)  # [G, O]
    return _int4_host(q, z, parts["scales"](), group_size)


def _gptq_host(parts: dict, g_idx, group_size: int, *, method: QuantMethod) -> QuantizedHost:
    """AutoGPTQ: qweight i32[I/8, O] packed along I, qzeros i32[G, O/8] along O (both in order),
    scales f16[G, O]; v1 checkpoints store zero - 1."""
    q = unpack_int4(parts["qweight"](), axis=0)  # [I, O]
    z = unpack_int4(parts["qzeros"](), axis=1).astype(np.int16) + method.gptq_zero_offset
    if g_idx is not None:
        got = np.asarray(g_idx())
        if not np.array_equal(got, np.arange(q.shape[0]) // group_size):
            raise ValueError("gptq g_idx is not sequential (act-order): not supported")
    # A v1 zero point of 0 was stored as 15 (0 - 1 wrapped) and reads back as 16, as in vLLM's
    # and AutoGPTQ's own kernels: kept as is (qzero is f16).
    return _int4_host(q, z, parts["scales"](), group_size)


def _int4_host(q: np.ndarray, z: np.ndarray, scales: np.ndarray, group_size: int
               ) -> QuantizedHost:
    I, O = q.shape
    if I % group_size or scales.shape != (I // group_size, O) or z.shape[0] != scales.shape[0]:
        raise ValueError(f"int4 tensors disagree: qweight [{I}, {O}], scales {scales.shape}, "
                         f"zeros {z.shape}, {group_size=}")
    return QuantizedHost(values=np.ascontiguousarray(q.T), zeros=np.ascontiguousarray(
        z.T), scales=np.ascontiguousarray(np.asarray(scales, np.float32).T))


# ---------------------------------------------------------------- host -> device leaves
def _our_layout(transform, w: np.ndarray, cfg, in_features: int) -> np.ndarray:
    """HF [O, I] -> transform (reshape/transpose/repeat to the einsum layout [in..., out...]) ->
    2-D [I, O']. Transforms move whole rows and columns, so they carry values and scales alike."""
    return transform(w, cfg).reshape(in_features, -1)


def linear_arrays(raw, transform, cfg, method: QuantMethod, qweight_shape: tuple[int, ...]
                  ) -> dict[str, np.ndarray]:
    """One projection's checkpoint tensor (float [O, I] or QuantizedHost) -> QuantLinear leaves
    in its device_format: fp8 {qweight e4m3 [O', I], qscale f32[O']}; int4 {qweight i32[I/8, O']
    (pack_int4), qscale f16[G, O'], qzero f16[G, O']} (int4_f32: f32 scales and zeros);
    int8_g32 {qweight i8[I, O'], qscale f16[G, O']}. O' is O after the transform (e.g. replicated
    kv heads); qweight_shape (the param's) gives I."""
    fmt = device_format(raw, method)
    in_features = {"fp8": qweight_shape[-1], "int8_g32": qweight_shape[0]}.get(
        fmt, qweight_shape[0] * INT4_PACK)
    if not isinstance(raw, QuantizedHost):  # fp8 (device_format refused the others)
        w2 = _our_layout(transform, np.asarray(raw, np.float32), cfg, in_features)  # [I, O']
        host = quantize_fp8(w2.T)
        return {"qweight": host.values, "qscale": host.scales[:, 0]}
    values = _our_layout(transform, raw.values.astype(np.float32), cfg, in_features)  # exact
    g = raw.group_size
    wide = lambda a: _our_layout(transform, np.repeat(a.astype(np.float32), g, axis=1), cfg,
                                 in_features)[::g]  # [G, O'] (one row per group)
    if fmt == "fp8":
        if raw.zeros is not None:
            raise ValueError("int4 tensors found in an fp8 checkpoint")
        return {"qweight": values.T.astype(FP8), "qscale": wide(raw.scales)[0]}
    if fmt != "int8_g32" and raw.zeros is None:
        raise ValueError(f"{method.name}: fp8 tensors found where int4 tensors belong")
    if g != method.group_size:
        raise ValueError(f"{method.name}: tensors have group size {g}, config says "
                         f"{method.group_size}")
    scale_dtype = leaf_shapes(fmt, in_features, 1, g)["qscale"][1]
    if fmt == "int8_g32":  # every value exact: i8 and f16 went through f32 and back
        return {"qweight": values.astype(np.int8), "qscale": wide(raw.scales).astype(scale_dtype)}
    return {"qweight": pack_int4(values.astype(np.uint8), g),
            "qscale": wide(raw.scales).astype(scale_dtype),
            "qzero": wide(raw.zeros).astype(scale_dtype)}


def device_format(raw, method: QuantMethod) -> str:
    """The device format a projection's checkpoint tensor loads into: the method's, except for
    GGUF, whose format is per tensor: int8 values (Q8_0) -> "int8_g32", int4 ones -> "int4_f32".
    Only fp8 quantizes a float tensor at load."""
    if not isinstance(raw, QuantizedHost):
        if method.weight_format != "fp8":
            raise ValueError(f"{method.name}: a float weight found where quantized tensors "
                             f"belong; only fp8 quantizes at load")
        return "fp8"
    if method.name == "gguf":
        return "int8_g32" if raw.values.dtype == np.int8 else "int4_f32"
    return method.weight_format


def pack_int4(q: np.ndarray, group_size: int) -> np.ndarray:
    """u8[I, O] nibbles -> i32[I/8, O], our device packing (kernels_pallas/quant_matmul): within
    each group of g input rows, packed row r's nibble j holds row j * g/8 + r, so a kernel gets
    the group's rows j*g/8 .. (j+1)*g/8 - 1 with one shift and mask, no interleave."""
    I, O = q.shape
    r = group_size // INT4_PACK
    blocks = q.reshape(I // group_size, INT4_PACK, r, O).astype(np.uint32)  # [G, j, r, O]
    words = np.zeros((I // group_size, r, O), np.uint32)
    for j in range(INT4_PACK):
        words |= blocks[:, j] << np.uint32(4 * j)
    return words.reshape(I // INT4_PACK, O).view(np.int32)


def leaf_shapes(weight_format: str, in_features: int, out_features: int, group_size: int
                ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Device leaves of a QuantLinear: name -> (shape, dtype)."""
    I, O = in_features, out_features
    if weight_format == "fp8":
        return {"qweight": ((O, I), FP8), "qscale": ((O,), np.dtype(np.float32))}
    if weight_format == "int8_g32":  # GGUF Q8_0: f16 holds its f16 block scales d exactly
        return {"qweight": ((I, O), np.dtype(np.int8)),
                "qscale": ((I // group_size, O), np.dtype(np.float16))}
    G = I // group_size
    # int4_f32 (GGUF): f32 keeps Q4_K's d * sub-scale (17 significant bits) and the zeros
    # -min/scale exact to f32 rounding; f16 would round them (1 bit per weight more than f16).
    f = np.dtype(np.float32 if weight_format == "int4_f32" else np.float16)
    return {"qweight": ((I // INT4_PACK, O), np.dtype(np.int32)),
            "qscale": ((G, O), f), "qzero": ((G, O), f)}
