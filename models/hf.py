"""HF checkpoint conventions shared by the Llama family: config.json fields -> ModelConfig, and
HF tensor names -> our param paths plus a transform to the einsum layout. Used by models/<arch>.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jaxserve.config import ModelConfig, hashable_rope_scaling
from models.layers import check_rope_scaling

# (HF tensor [out, in] in numpy, config) -> array in our param layout
Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either HF 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) config dicts; scaling is None for the default rope."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = params or dict(hf.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    partial = scaling.get("partial_rotary_factor", 1.0) != 1.0  # kept even for the default rope
    return float(theta), (None if rope_type == "default" and not partial else scaling)


def base_config_from_hf(hf: dict, **flags) -> ModelConfig:
    """The fields every Llama-family config.json shares; `flags` are per-architecture extras."""
    if hf.get("attention_bias") and not flags.get("qkv_bias"):
        raise ValueError(f"attention_bias=True is not supported for {hf.get('architectures')}")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    num_heads = hf["num_attention_heads"]
    theta, scaling = rope_from_hf(hf)
    check_rope_scaling(scaling)
    arch = (hf.get("architectures") or ["?"])[0]
    fields = dict(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_q_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=hashable_rope_scaling(scaling),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(flags)
    return ModelConfig(**fields)


def _kv_heads(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Repeat each HF kv head kv_replication times along axis -2 (consecutively, so q head n still
    reads a copy of HF kv head n // (N / K_hf))."""
    return np.repeat(w, cfg.kv_replication, axis=-2) if cfg.kv_replication > 1 else w


def q_kernel(w, cfg):  # [N*H, D] -> [D, N, H]
    return w.reshape(cfg.num_q_heads, cfg.head_dim, -1).transpose(2, 0, 1)


def kv_kernel(w, cfg):  # [K_hf*H, D] -> [D, K, H]
    return _kv_heads(w.reshape(-1, cfg.head_dim, w.shape[-1]).transpose(2, 0, 1), cfg)


def o_kernel(w, cfg):  # [D, N*H] -> [N, H, D]
    return w.reshape(w.shape[0], cfg.num_q_heads, cfg.head_dim).transpose(1, 2, 0)


def q_bias(w, cfg):  # [N*H] -> [N, H]
    return w.reshape(cfg.num_q_heads, cfg.head_dim)


def kv_bias(w, cfg):  # [K_hf*H] -> [K, H]
    return _kv_heads(w.reshape(-1, cfg.head_dim), cfg)


def transpose(w, cfg):  # [out, in] -> [in, out]
    return w.T


def identity(w, cfg):
    return w


_LAYER = r"model\.layers\.(\d+)\."
LLAMA_WEIGHT_MAP: dict[str, tuple[str, Transform]] = {
    r"model\.embed_tokens\.weight": ("embed", identity),
    r"model\.norm\.weight": ("final_norm.scale", identity),
    r"lm_head\.weight": ("lm_head", transpose),
    _LAYER + r"input_layernorm\.weight": ("layers.{0}.input_norm.scale", identity),
    _LAYER + r"post_attention_layernorm\.weight": ("layers.{0}.post_attn_norm.scale", identity),
    _LAYER + r"self_attn\.q_proj\.weight": ("layers.{0}.attn.q_proj", q_kernel),
    _LAYER + r"self_attn\.k_proj\.weight": ("layers.{0}.attn.k_proj", kv_kernel),
    _LAYER + r"self_attn\.v_proj\.weight": ("layers.{0}.attn.v_proj", kv_kernel),
    _LAYER + r"self_attn\.o_proj\.weight": ("layers.{0}.attn.o_proj", o_kernel),
    _LAYER + r"mlp\.gate_proj\.weight": ("layers.{0}.mlp.gate_proj", transpose),
    _LAYER + r"mlp\.up_proj\.weight": ("layers.{0}.mlp.up_proj", transpose),
    _LAYER + r"mlp\.down_proj\.weight": ("layers.{0}.mlp.down_proj", transpose),
}
QKV_BIAS_WEIGHT_MAP: dict[str, tuple[str, Transform]] = {
    _LAYER + r"self_attn\.q_proj\.bias": ("layers.{0}.attn.q_bias", q_bias),
    _LAYER + r"self_attn\.k_proj\.bias": ("layers.{0}.attn.k_bias", kv_bias),
    _LAYER + r"self_attn\.v_proj\.bias": ("layers.{0}.attn.v_bias", kv_bias),
}
QK_NORM_WEIGHT_MAP: dict[str, tuple[str, Transform]] = {
    _LAYER + r"self_attn\.q_norm\.weight": ("layers.{0}.attn.q_norm.scale", identity),
    _LAYER + r"self_attn\.k_norm\.weight": ("layers.{0}.attn.k_norm.scale", identity),
}


@dataclass(frozen=True)
class Stacked:
    """A weight-map transform for a param that stacks one HF tensor per expert along a new leading
    axis E (Mixtral's experts.{e}.w1 -> [E, D, F]); the pattern's LAST group is the expert index.
    The loader calls it with the list of HF tensors in expert order."""

    transform: Transform  # applied to each expert's tensor

    def __call__(self, tensors: list[np.ndarray], cfg: ModelConfig) -> np.ndarray:
        return np.stack([self.transform(t, cfg) for t in tensors])


def map_weight_names(names, weight_map: dict[str, tuple[str, Transform]]
                     ) -> tuple[dict[str, tuple[str, Transform]], list[str]]:
    """HF tensor names -> ({param path: (HF name, transform)}, unmatched HF names).

    A weight-map value may be a list of (path, transform): one fused HF tensor feeding several
    params (Phi-3's qkv_proj). A Stacked transform maps to (tuple of HF names by expert, transform).
    """
    compiled = [(re.compile(pattern), target if isinstance(target, list) else [target])
                for pattern, target in weight_map.items()]
    mapped, unmatched, experts = {}, [], {}
    for name in names:
        for pattern, targets in compiled:
            if (m := pattern.fullmatch(name)) is not None:
                for path, transform in targets:
                    if isinstance(transform, Stacked):
                        *groups, expert = m.groups()
                        key = (path.format(*groups), transform)
                        experts.setdefault(key, {})[int(expert)] = name
                    else:
                        mapped[path.format(*m.groups())] = (name, transform)
                break
        else:
            unmatched.append(name)
    for (path, transform), by_expert in experts.items():
        mapped[path] = (tuple(by_expert[e] for e in sorted(by_expert)), transform)
    return mapped, unmatched
