"""Projections of the decoder blocks, whatever the weight format: layers.py builds each with
`projection(...)` and applies it with `project(spec, x, w)`.

Unquantized (cfg.quantization None): an nnx.Param in the einsum layout and `jnp.einsum(spec, ...)`,
exactly the plain path. Quantized: a QuantLinear holding the format's leaves (models/quant.py):
fp8 W8A8 through `lax.dot_general` on e4m3 inputs (XLA's FP8 GEMM on Hopper), int4 (AWQ/GPTQ;
GGUF's Q4 blocks as int4_f32) kept packed and dequantized inside kernels_pallas/quant_matmul,
int8_g32 (GGUF's Q8_0) dequantized to the activation dtype before one XLA matmul.
The format is per projection: a GGUF model (cfg.quantization "gguf") is built int4_f32, then
set_projection_formats gives each projection its tensor's format, or a plain param (Q6_K, F16).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.sharding import num_shards
from kernels_pallas.quant_matmul import int4_matmul
from models.quant import FP8_MAX, leaf_shapes

FORMATS = ("fp8", "int4", "int4_f32", "int8_g32")  # QuantLinear.weight_format (models/quant.py)


def projection(cfg: ModelConfig, rngs: nnx.Rngs, shape: tuple[int, ...],
               names: tuple[str, ...], dtype, *, num_in: int = 1):
    """The weight of a projection from the first `num_in` axes of `shape` to the rest (einsum
    layout, e.g. q_proj (D, N, H) with num_in=1, o_proj (N, H, D) with num_in=2)."""
    if cfg.quantization is None:
        from models.layers import param  # layers imports this module

        return param(rngs, shape, names, dtype)
    # "gguf": per projection, set after the build (set_projection_formats); int4_f32 until then.
    fmt = "int4_f32" if cfg.quantization == "gguf" else cfg.quantization
    return QuantLinear(fmt, shape, names, num_in=num_in, group_size=cfg.quant_group_size,
                       rngs=rngs)


def project(spec: str, x: jax.Array, w) -> jax.Array:
    """x [T, in...] -> [T, out...]: `jnp.einsum(spec, x, w)` for a Param, w(x) for a QuantLinear."""
    if isinstance(w, QuantLinear):
        return w(x)
    return jnp.einsum(spec, x, w[...])


class QuantLinear(nnx.Module):
    """A quantized projection stored 2-D over in = prod(in axes), out = prod(out axes) (row-major
    flattening, so a tensor-parallel split of the first out axis is a split of the flat axis).

    fp8:  qweight e4m3 [O, I] (contracting dim minor: the "TN" layout cuBLASLt FP8 wants),
          qscale f32[O] per output channel.
    int4: qweight i32[I/8, O] (packing: models.quant.pack_int4), qscale/qzero f16[I/g, O]
          (int4_f32: f32, GGUF).
    int8_g32: qweight i8[I, O], qscale f16[I/g, O] (GGUF Q8_0, g = 32): w = q * scale.
    """

    def __init__(self, weight_format: str, shape: tuple[int, ...], names: tuple[str, ...], *,
                 num_in: int, group_size: int, rngs: nnx.Rngs):
        if weight_format not in FORMATS:
            raise ValueError(f"{weight_format=} must be one of {FORMATS}")
        self.weight_format, self.group_size, self.num_in = weight_format, group_size, num_in
        self.shape, self.names = tuple(shape), tuple(names)  # the plain param's
        self.in_features = math.prod(shape[:num_in])
        self.out_shape = tuple(shape[num_in:])
        in_name, out_name = names[0], names[num_in]
        leaf_names = {"qweight": (out_name, in_name), "qscale": (out_name,)} if (
            weight_format == "fp8") else {"qweight": (in_name, out_name),
                                          "qscale": (in_name, out_name),
                                          "qzero": (in_name, out_name)}
        for leaf, (leaf_shape, dtype) in leaf_shapes(weight_format, self.in_features,
                                                     math.prod(self.out_shape),
                                                     group_size).items():
            init = nnx.with_partitioning(nnx.initializers.zeros, leaf_names[leaf],
                                         eager_sharding=False)
            setattr(self, leaf, nnx.Param(init(rngs.params(), leaf_shape, dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, in...] -> [T, out...]
        x2 = x.reshape(x.shape[0], self.in_features)
        if self.weight_format == "fp8":
            y = fp8_matmul(x2, self.qweight[...], self.qscale[...])
        elif self.weight_format == "int8_g32":
            y = int8_matmul(x2, self.qweight[...], self.qscale[...], group_size=self.group_size)
        else:
            # Pallas kernels are not partitioned by XLA: under tensor parallelism the dequantize +
            # matmul path runs (XLA shards it like any matmul).
            impl = "auto" if num_shards("q_heads") == 1 else "xla"
            y = int4_matmul(x2, self.qweight[...], self.qscale[...], self.qzero[...],
                            group_size=self.group_size, impl=impl)
        return y.reshape(x.shape[0], *self.out_shape)


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [T, I] -> (e4m3 [T, I], f32[T, 1] scale): dynamic per-token scale amax / 448 (vLLM's
    dynamic per-token activation scheme; an all-zero row gets a tiny scale, not 0/0)."""
    xf = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), 1e-12) / FP8_MAX
    return jnp.clip(xf / scale, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn), scale


def fp8_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array) -> jax.Array:
    """W8A8: x [T, I] (bf16/f32), w e4m3 [O, I], w_scale f32[O] -> [T, O] in x's dtype.

    Both operands e4m3 into one dot_general with f32 accumulation (on Hopper XLA emits a
    cuBLASLt FP8 GEMM; on CPU it is emulated), then the two scales on the f32 result."""
    xq, x_scale = quantize_per_token(x)
    y = jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * x_scale * w_scale[None, :]).astype(x.dtype)


def fp8_matmul_reference(x: jax.Array, w: jax.Array, w_scale: jax.Array) -> jax.Array:
    """Same contract as fp8_matmul, dequantized to f32 first: (q(x) * s_x) @ (w * s_w)^T."""
    xf = x.astype(jnp.float32)
    s_x = jnp.maximum(jnp.abs(xf).max(axis=1, keepdims=True), 1e-12) / FP8_MAX
    x_dq = jnp.clip(xf / s_x, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    w_dq = w.astype(jnp.float32) * w_scale[:, None]
    y = jnp.matmul(x_dq * s_x, w_dq.T, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def dequantize_int8(qweight: jax.Array, scales: jax.Array, *, group_size: int,
                    dtype=jnp.float32) -> jax.Array:
    """qweight i8[I, O], scales [I/g, O] -> w [I, O] = q * scale in `dtype`, computed in f32
    (exact there for GGUF's f16 scales: 8 x 11 significant bits)."""
    I, O = qweight.shape
    q = qweight.reshape(I // group_size, group_size, O).astype(jnp.float32)
    return (q * scales.astype(jnp.float32)[:, None, :]).reshape(I, O).astype(dtype)


def int8_matmul(x: jax.Array, qweight: jax.Array, scales: jax.Array, *, group_size: int
                ) -> jax.Array:
    """x [T, I] @ int8 weight (qweight i8[I, O], scales [I/g, O]) -> [T, O] in x's dtype: the
    weight dequantized to x's dtype (XLA fuses it into the matmul's operand; the same path as
    int4's prefill), one matmul with f32 accumulation. Sharded by XLA like any matmul."""
    w = dequantize_int8(qweight, scales, group_size=group_size, dtype=x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def set_projection_formats(model: nnx.Module, formats: dict[str, str], dtype,
                           rngs: nnx.Rngs) -> int:
    """Give every QuantLinear its own format: the one `formats` names for its path
    ("layers.0.mlp.down_proj" -> "int8_g32"), or, for a path not in `formats`, the plain
    einsum-layout param `projection` builds unquantized (same shape and logical names). This is
    how a GGUF file's Q4 projections load int4_f32, its Q8_0 ones int8_g32 and its Q6_K/F16 ones
    expanded, in one model. Returns how many were replaced."""
    from models.layers import param  # layers imports this module

    found = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, QuantLinear)
             and formats.get(".".join(map(str, path))) != node.weight_format]
    for path, node in found:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        fmt = formats.get(".".join(map(str, path)))
        setattr(parent, path[-1], param(rngs, node.shape, node.names, dtype) if fmt is None
                else QuantLinear(fmt, node.shape, node.names, num_in=node.num_in,
                                 group_size=node.group_size, rngs=rngs))
    return len(found)
