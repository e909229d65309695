"""Gemma 2 (and the blocks Gemma 3 reuses): GeGLU, (1 + w) RMSNorm before and after attention and
MLP, embeddings scaled by sqrt(D), attention and final logit soft-capping, query_pre_attn_scalar,
and sliding-window layers interleaved with global ones, each layer with its own window and rope.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.kv_cache import AttentionMetadata
from jaxserve.sharding import shard
from models.hf import LLAMA_WEIGHT_MAP, base_config_from_hf, identity
from models.layers import Attention, CausalLM, GatedMLP, RMSNorm

_LAYER = r"model\.layers\.(\d+)\."
WEIGHT_MAP = {
    **LLAMA_WEIGHT_MAP,
    _LAYER + r"pre_feedforward_layernorm\.weight": ("layers.{0}.pre_mlp_norm.scale", identity),
    _LAYER + r"post_feedforward_layernorm\.weight": ("layers.{0}.post_mlp_norm.scale", identity),
}
LAYER_TYPES = ("sliding_attention", "full_attention")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")  # HF names of tanh-approximated gelu


@dataclass(frozen=True, kw_only=True)
class GemmaConfig(ModelConfig):
    """ModelConfig plus what Gemma 2/3 add. `sliding_window` is the window of the sliding layers
    only; `rope_theta`/`rope_scaling` are the global layers' rope."""

    layer_types: tuple[str, ...]  # [L] "sliding_attention" | "full_attention"
    query_pre_attn_scalar: float  # softmax scale = query_pre_attn_scalar ** -0.5
    final_logit_soft_cap: float | None = None  # logits = cap * tanh(logits / cap)
    rope_local_theta: float | None = None  # sliding layers' rope base (Gemma 3); None = rope_theta

    def __post_init__(self):
        super().__post_init__()
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"{len(self.layer_types)=} must equal num_layers={self.num_layers}")
        if bad := set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"layer_types {sorted(bad)} not supported; supported: {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError(f"sliding_attention layers need a sliding_window, got "
                             f"{self.sliding_window=}")

    def layer_config(self, layer_idx: int) -> ModelConfig:
        """The config layer `layer_idx`'s attention reads: its window (None on global layers) and
        its rope (the local base without scaling on Gemma 3's sliding layers)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        if self.layer_types[layer_idx] == "full_attention":
            fields["sliding_window"] = None
        elif self.rope_local_theta is not None:
            fields.update(rope_theta=self.rope_local_theta, rope_scaling=None)
        return ModelConfig(**fields)


def check_gemma_hf(hf: dict) -> None:
    """ValueError for Gemma config.json options we do not implement."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise ValueError(f"Gemma hidden_activation={act!r} is not supported; "
                         f"supported: {GELU_TANH}")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma use_bidirectional_attention=True (an encoder) is not supported")


def gemma_layer_types(hf: dict, pattern: int) -> tuple[str, ...]:
    """config.json layer_types, else every `pattern`-th layer global (HF's default rule)."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(hf["num_hidden_layers"]))


def config_from_hf(hf: dict) -> GemmaConfig:
    check_gemma_hf(hf)
    base = base_config_from_hf(hf, sliding_window=hf.get("sliding_window", 4096),
                               attn_logits_soft_cap=hf.get("attn_logit_softcapping"))
    return GemmaConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                       layer_types=gemma_layer_types(hf, 2),
                       query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                       final_logit_soft_cap=hf.get("final_logit_softcapping"))


def gelu_tanh(x: jax.Array) -> jax.Array:
    """HF gelu_pytorch_tanh. A named function, not a partial: it sits in the static graphdef."""
    return jax.nn.gelu(x, approximate=True)


class GemmaDecoderLayer(nnx.Module):
    """x + post_attn_norm(attn(input_norm(x))), then x + post_mlp_norm(mlp(pre_mlp_norm(x)))."""

    def __init__(self, cfg: GemmaConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype,
                                 rngs=rngs, unit_offset=True)
        self.input_norm = norm()
        self.attn = Attention(cfg.layer_config(layer_idx), dtype=dtype, rngs=rngs,
                              sm_scale=cfg.query_pre_attn_scalar ** -0.5, norm_unit_offset=True)
        self.post_attn_norm = norm()
        self.pre_mlp_norm = norm()
        self.mlp = GatedMLP(cfg, dtype=dtype, rngs=rngs,
                            activation=gelu_tanh)
        self.post_mlp_norm = norm()

    def __call__(self, x: jax.Array, md: AttentionMetadata, k_pages: jax.Array,
                 v_pages: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, D] -> (y [T, D], new k_pages, new v_pages)."""
        with jax.named_scope("attn"):
            h, k_pages, v_pages = self.attn(self.input_norm(x), md, k_pages, v_pages)
        x = x + self.post_attn_norm(h)
        with jax.named_scope("mlp"):
            x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        return shard(x, "tokens", "embed"), k_pages, v_pages


class Gemma2(CausalLM):
    """Gemma2ForCausalLM: Gemma layers, embeddings times sqrt(D) (rounded to the param dtype, as
    HF does), a (1 + w) final norm, and the final logit soft cap."""

    def __init__(self, cfg: GemmaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs,
                                  unit_offset=True)

    def make_layer(self, cfg: GemmaConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        return GemmaDecoderLayer(cfg, layer_idx, dtype=dtype, rngs=rngs)

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """Embeddings times sqrt(D), the scale rounded to the param dtype as HF does."""
        embed = self.embed[...]
        return jnp.take(embed, token_ids, axis=0) * jnp.asarray(self.cfg.hidden_size ** 0.5,
                                                                embed.dtype)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, D] -> f32[B, V], soft-capped when the config says so."""
        logits = super().compute_logits(hidden)
        cap = self.cfg.final_logit_soft_cap
        return logits if cap is None else cap * jnp.tanh(logits / cap)
