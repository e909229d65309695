"""Shared Flax NNX blocks of the Llama-family decoders: RMSNorm, rope, Attention, GatedMLP, CausalLM.

The runner calls `CausalLM(token_ids, md, kv) -> (hidden, kv)` then `compute_logits(hidden[last])`.
Params carry logical axis names only (see jaxserve/sharding.py); weights.py places them on a mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig, hashable_rope_scaling
from jaxserve.kv_cache import AttentionMetadata, KVCache, write_kv
from jaxserve.sharding import heads_parallel, shard
from kernels_pallas.ragged_paged_attention import ragged_paged_attention
from models.lora import attention_loras, mlp_loras
from models.linear import project, projection

logger = logging.getLogger("jaxserve")

# Implemented HF rope_type values -> the rope_scaling keys each needs (checked at load, hf.py).
ROPE_REQUIRED_KEYS = {"default": (), "linear": ("factor",), "yarn": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                 "original_max_position_embeddings"),
                      "longrope": ("long_factor", "short_factor",
                                   "original_max_position_embeddings")}
ROPE_TYPES = tuple(ROPE_REQUIRED_KEYS)


def check_rope_scaling(scaling: dict | None) -> None:
    """ValueError naming an unimplemented rope_type or a missing key, so a model fails at load
    rather than at its first forward pass (where rope_frequencies reads these)."""
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling {rope_type=} is not supported; supported: {ROPE_TYPES}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0 and rope_type == "yarn":
        raise ValueError(f"partial_rotary_factor with rope_scaling {rope_type=} is not supported")
    missing = [k for k in ROPE_REQUIRED_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling {rope_type=} lacks {missing}: {scaling}")


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype,
          init: str = "normal") -> nnx.Param:
    """A Param annotated with logical axis names; `init` is "normal" (std 0.02), "ones" or "zeros".

    eager_sharding=False: the model is built abstractly (nnx.eval_shape) and weights.py places every
    array itself, so flax must not try to shard values at construction time.
    """
    initializer = {"normal": nnx.initializers.normal(0.02), "ones": nnx.initializers.ones,
                   "zeros": nnx.initializers.zeros}[init]
    annotated = nnx.with_partitioning(initializer, names, eager_sharding=False)
    return nnx.Param(annotated(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, with the statistics in f32 (HF LlamaRMSNorm).

    unit_offset=True (Gemma): y = x / rms(x) * (1 + scale), all in f32 and cast last (HF
    GemmaRMSNorm); checkpoints store `scale` around 0.
    """

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs, unit_offset: bool = False):
        self.scale = param(rngs, (dim,), ("norm",), dtype, init="zeros" if unit_offset else "ones")
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., dim] -> [..., dim]
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return xf.astype(x.dtype) * self.scale[...]


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies f32[H/2] and the attention (cos/sin) scale for cfg's rope_scaling.

    Plain numpy at trace time, so XLA sees constants. Follows HF's rope init functions.
    """
    scaling = cfg.rope_scaling_dict or {}
    check_rope_scaling(scaling)
    # partial_rotary_factor (Phi-4-mini): rope over the first head_dim * factor dims only.
    dim = int(cfg.head_dim * scaling.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, scaling, cfg)
    elif rope_type == "longrope":
        return _longrope_inv_freq(inv_freq, scaling, cfg)
    return inv_freq.astype(np.float32), 1.0


def _longrope_inv_freq(inv_freq: np.ndarray, s: dict, cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """LongRoPE (Phi-3, HF `_compute_longrope_parameters`): inv_freq / long_factor or short_factor,
    and cos/sin scaled by sqrt(1 + ln(factor) / ln(original_max)) with factor = max_position /
    original_max. HF picks the set per forward pass by the sequence length; a paged cache cannot
    re-rotate its keys, so the set is fixed per model by the served context (`max_model_len`, see
    longrope_for_context), as llama.cpp does: long factors iff it exceeds original_max."""
    original_max = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / original_max
    attn_factor = s.get("attention_factor") or (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max)))
    use_long = s.get("max_model_len", cfg.max_position_embeddings) > original_max
    ext = np.asarray(s["long_factor" if use_long else "short_factor"], np.float64)
    if ext.shape != inv_freq.shape:
        raise ValueError(f"longrope factors have {ext.shape[0]} entries, head_dim/2 is "
                         f"{inv_freq.shape[0]}")
    return (inv_freq / ext).astype(np.float32), float(attn_factor)


def longrope_for_context(cfg: ModelConfig, max_model_len: int) -> ModelConfig:
    """Record the served context in a LongRoPE config (it picks the factor set); others as is."""
    scaling = cfg.rope_scaling_dict or {}
    if scaling.get("rope_type", scaling.get("type")) != "longrope":
        return cfg
    return dataclasses.replace(cfg, rope_scaling=hashable_rope_scaling(
        {**scaling, "max_model_len": max_model_len}))


def _llama3_inv_freq(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: np.ndarray, s: dict, cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """YaRN (HF `_compute_yarn_parameters`, truncate=True): blend interpolation and extrapolation."""
    factor, dim, base = s["factor"], cfg.head_dim, cfg.rope_theta
    old_len = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
    attn_factor = s.get("attention_factor") or 0.1 * math.log(factor) + 1.0
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    extrapolation_weight = 1 - ramp
    blended = inv_freq / factor * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return blended.astype(np.float32), float(attn_factor)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray,
               attn_factor: float = 1.0) -> jax.Array:
    """Rotate-half rope (HF layout): x [T, heads, H], positions i32[T] -> [T, heads, H]. With
    fewer than H/2 frequencies (partial rotary) the dims past 2 * len(inv_freq) pass unchanged."""
    rotary = 2 * np.shape(inv_freq)[-1]
    if rotary < x.shape[-1]:
        rotated = apply_rope(x[..., :rotary], positions, inv_freq, attn_factor)
        return jnp.concatenate([rotated, x[..., rotary:]], axis=-1)
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, H/2]
    cos = jnp.cos(angles) * attn_factor
    sin = jnp.sin(angles) * attn_factor
    cos2 = jnp.concatenate([cos, cos], axis=-1)[:, None, :]  # [T, 1, H]
    sin2 = jnp.concatenate([-sin, sin], axis=-1)[:, None, :]
    # [x1, x2] * cos2 + [x2, x1] * sin2 = [x1 cos - x2 sin, x2 cos + x1 sin]. The halves are
    # swapped by reversing a size-2 axis, an indexing op XLA fuses with the arithmetic: one pass
    # over q / k. (Concatenating the two rotated halves was a separate f32 kernel on the H200,
    # "wrapped_concatenate", 0.81 ms per 512-token Llama-3-8B step.)
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(*x.shape[:-1], 2, x.shape[-1] // 2)[..., ::-1, :].reshape(x.shape)
    return (xf * cos2 + swapped * sin2).astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention over the paged KV cache; flags cover Qwen2 (qkv_bias) and Qwen3 (qk_norm).

    sm_scale: the softmax scale (None = head_dim ** -0.5; Gemma: query_pre_attn_scalar ** -0.5).
    norm_unit_offset: the q/k norms are Gemma's (1 + scale) RMSNorm. The window, soft cap and rope
    come from `cfg`, which Gemma builds per layer (sliding or global).
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, sm_scale: float | None = None,
                 norm_unit_offset: bool = False):
        D, N, K, H = cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.sm_scale = cfg.head_dim ** -0.5 if sm_scale is None else sm_scale
        self.q_proj = projection(cfg, rngs, (D, N, H), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = projection(cfg, rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = projection(cfg, rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_proj = projection(cfg, rngs, (N, H, D), ("q_heads", "head_dim", "embed"), dtype,
                                 num_in=2)
        if cfg.qkv_bias:
            self.q_bias = param(rngs, (N, H), ("q_heads", "head_dim"), dtype, init="zeros")
            self.k_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), dtype, init="zeros")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, cfg.rms_norm_eps, dtype=dtype, rngs=rngs,
                                  unit_offset=norm_unit_offset)
            self.k_norm = RMSNorm(H, cfg.rms_norm_eps, dtype=dtype, rngs=rngs,
                                  unit_offset=norm_unit_offset)
        if cfg.max_loras:  # stacked LoRA adapters (models/lora.py)
            self.q_lora, self.k_lora, self.v_lora, self.o_lora = attention_loras(
                cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, md: AttentionMetadata, k_pages: jax.Array,
                 v_pages: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, D], pages [P, S, K, H] -> (out [T, D], new k_pages, new v_pages)."""
        cfg = self.cfg
        q = project("TD,DNH->TNH", x, self.q_proj)
        k = project("TD,DKH->TKH", x, self.k_proj)
        v = project("TD,DKH->TKH", x, self.v_proj)
        if cfg.max_loras:
            q, k, v = (q + self.q_lora(x, md.lora_slots), k + self.k_lora(x, md.lora_slots),
                       v + self.v_lora(x, md.lora_slots))
        if cfg.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, attn_factor = rope_frequencies(cfg)
        q = apply_rope(q, md.positions, inv_freq, attn_factor)
        k = apply_rope(k, md.positions, inv_freq, attn_factor)
        k_pages = write_kv(k_pages, k, md.slot_mapping)
        v_pages = write_kv(v_pages, v, md.slot_mapping)
        attend = functools.partial(
            ragged_paged_attention, sm_scale=self.sm_scale,
            sliding_window=cfg.sliding_window, soft_cap=cfg.attn_logits_soft_cap,
            impl=md.attention_impl)
        o = heads_parallel(attend)(q, k_pages, v_pages, md.kv_lens, md.page_table, md.cu_q_lens,
                                   md.num_seqs)  # [T, N, H]
        out = project("TNH,NHD->TD", o, self.o_proj)
        if cfg.max_loras:
            out = out + self.o_lora(o, md.lora_slots)
        return out, k_pages, v_pages


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)); `intermediate_size` overrides cfg's F (MoE shared experts);
    `activation` is silu (Llama) or tanh-approximated gelu (Gemma's GeGLU)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs,
                 intermediate_size: int | None = None, activation=jax.nn.silu):
        D, F = cfg.hidden_size, intermediate_size or cfg.intermediate_size
        self.activation = activation
        self.gate_proj = projection(cfg, rngs, (D, F), ("embed", "ffw"), dtype)
        self.up_proj = projection(cfg, rngs, (D, F), ("embed", "ffw"), dtype)
        self.down_proj = projection(cfg, rngs, (F, D), ("ffw", "embed"), dtype)
        self.max_loras = cfg.max_loras
        if cfg.max_loras:  # stacked LoRA adapters (models/lora.py)
            self.gate_lora, self.up_lora, self.down_lora = mlp_loras(cfg, F, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, lora_slots: jax.Array | None = None) -> jax.Array:
        """x [T, D] -> [T, D]; lora_slots i32[T] (md.lora_slots) when the model has LoRA slots."""
        gate = project("TD,DF->TF", x, self.gate_proj)
        up = project("TD,DF->TF", x, self.up_proj)
        if self.max_loras:
            gate, up = gate + self.gate_lora(x, lora_slots), up + self.up_lora(x, lora_slots)
        h = self.activation(gate) * up
        out = project("TF,FD->TD", h, self.down_proj)
        if self.max_loras:
            out = out + self.down_lora(h, lora_slots)
        return out


class DecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    `mlp` replaces the GatedMLP with any [T, D] -> [T, D] module (a mixture of experts, models/moe.py).
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs, mlp: nnx.Module | None = None):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = mlp if mlp is not None else GatedMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, md: AttentionMetadata, k_pages: jax.Array,
                 v_pages: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, D] -> (y [T, D], new k_pages, new v_pages)."""
        with jax.named_scope("attn"):
            h, k_pages, v_pages = self.attn(self.input_norm(x), md, k_pages, v_pages)
        x = x + h
        with jax.named_scope("mlp"):
            h = self.post_attn_norm(x)
            x = x + (self.mlp(h, md.lora_slots) if isinstance(self.mlp, GatedMLP) else self.mlp(h))
        return shard(x, "tokens", "embed"), k_pages, v_pages


@functools.partial(jax.jit, static_argnums=0)
def decoder_layer(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, md: AttentionMetadata,
                  k_pages: jax.Array, v_pages: jax.Array):
    """One decoder layer as its own jit: (x [T, D], pages) -> (y [T, D], new pages).

    For start-up, not speed: inside the step's trace, layers of one structure and shapes hit
    jit's trace cache, so a step traces one layer body (not num_layers; the two sampler variants
    of a token bucket share it too) and lowers it to one MLIR function called num_layers times.
    XLA inlines the calls: the compiled step is the same (CPU: same optimized HLO op counts).
    Llama-3-8B, warm-up's 22 step shapes lowered on CPU (reference attention): 22.3 s -> 7.0 s
    (benchmarks/startup_trace.py). Models call it through run_layer."""
    return nnx.merge(graphdef, params)(x, md, k_pages, v_pages)


# The platform a step with this attention kernel lowers for (the kernel's); else the default.
_KERNEL_PLATFORMS = {"pallas_gpu": ("cuda",), "pallas_tpu": ("tpu",)}
_exported: dict = {}  # (graphdef, input types, mesh) -> jax.export.Exported, or None: plain jit


def run_layer(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, md: AttentionMetadata,
              k_pages: jax.Array, v_pages: jax.Array):
    """decoder_layer, lowered once per process for each layer structure and shapes (jax.export)
    and its StableHLO spliced into every step that calls it: the two sampler variants of a token
    bucket (and the deferred forward) share one lowering of the attention kernel, most of a
    step's lowering with Mosaic GPU (llama-3-8b, 22 warm-up shapes lowered for cuda on CPU:
    22.7 s -> 15.6-17.2 s; with the reference attention it costs ~1.5 s more). The StableHLO
    is decoder_layer's: XLA compiles the same step (CPU: bitwise-equal outputs, TP 1 and 2)."""
    args = (params, x, md, k_pages, v_pages)
    if os.environ.get("JAXSERVE_EXPORT_LAYERS", "1") == "0":  # off: every step lowers its layers
        return decoder_layer(graphdef, *args)
    types = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    key = (graphdef, jax.tree.structure(types), tuple(jax.tree.leaves(types)),
           jax.sharding.get_abstract_mesh())
    if key not in _exported:
        fn = jax.jit(functools.partial(decoder_layer, graphdef))
        # Mosaic GPU and TPU kernels are export-stable custom calls; Triton ones (the quantized
        # and MoE matmuls) are not marked so, but these exports never leave the process.
        checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        try:
            _exported[key] = jax.export.export(
                fn, platforms=_KERNEL_PLATFORMS.get(md.attention_impl),
                disabled_checks=checks)(*types)
        except Exception:  # noqa: BLE001 (a start-up saving only: lower it in the step instead)
            logger.warning("decoder layer not exported; each step lowers its own", exc_info=True)
            _exported[key] = None
    exported = _exported[key]
    if exported is None:
        return decoder_layer(graphdef, *args)
    return exported.call(*args)


class CausalLM(nnx.Module):
    """Embedding, decoder layers, final norm and LM head. Architectures subclass it with flags only."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([self.make_layer(cfg, i, dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def make_layer(self, cfg: ModelConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        """Decoder layer `layer_idx`; architectures whose layers differ (MoE) override this."""
        return DecoderLayer(cfg, dtype=dtype, rngs=rngs)

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """i32[T] -> [T, D] input embeddings (Gemma scales them)."""
        return jnp.take(self.embed[...], token_ids, axis=0)

    def __call__(self, token_ids: jax.Array, md: AttentionMetadata,
                 kv: KVCache) -> tuple[jax.Array, KVCache]:
        """token_ids i32[T] -> (hidden [T, D] AFTER the final norm, new KVCache).

        Positions come from md.positions. The cache is returned, never mutated.
        """
        x = shard(self.embed_tokens(token_ids), "tokens", "embed")  # [T, D]
        new_k, new_v = [], []
        for layer, k_pages, v_pages in zip(self.layers, kv.k, kv.v):
            graphdef, params = nnx.split(layer)
            x, k_pages, v_pages = run_layer(graphdef, params, x, md, k_pages, v_pages)
            new_k.append(k_pages)
            new_v.append(v_pages)
        return self.final_norm(x), KVCache(k=new_k, v=new_v)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, D] (already final-normed by __call__) -> f32[B, V]; tied models reuse embed."""
        # f32 out of the matmul, not bf16 rounded then cast: bf16 logits tie exactly (8-bit
        # mantissa), and greedy decoding would then break ties by rounding noise.
        if self.cfg.tie_word_embeddings:
            return jnp.einsum("BD,VD->BV", hidden, self.embed[...],
                              preferred_element_type=jnp.float32)
        return jnp.einsum("BD,DV->BV", hidden, self.lm_head[...],
                          preferred_element_type=jnp.float32)
