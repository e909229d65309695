"""Phi-3 (mini / medium, 4k and 128k) and Phi-4-mini: Llama with fused qkv_proj and gate_up_proj
weights (split into our q/k/v and gate/up params at load), LongRoPE for the 128k variants, rope over
part of head_dim (partial_rotary_factor, Phi-4-mini), and Mistral's sliding window where set."""
from __future__ import annotations

from jaxserve.config import ModelConfig
from models.hf import LLAMA_WEIGHT_MAP, base_config_from_hf, kv_kernel, q_kernel, transpose
from models.layers import CausalLM

_LAYER = r"model\.layers\.(\d+)\."


def _q_rows(w, cfg):  # fused [N*H + 2*K_hf*H, D] -> [D, N, H]
    return q_kernel(w[:cfg.num_q_heads * cfg.head_dim], cfg)


def _kv_rows(index: int):
    def split(w, cfg):  # fused [N*H + 2*K_hf*H, D] -> [D, K, H] (index 0: k, 1: v)
        q_rows = cfg.num_q_heads * cfg.head_dim
        kv_rows = (w.shape[0] - q_rows) // 2
        return kv_kernel(w[q_rows + index * kv_rows:q_rows + (index + 1) * kv_rows], cfg)
    return split


def _gate_rows(w, cfg):  # fused [2F, D]: gate rows first, then up (HF chunk(2))
    return transpose(w[:w.shape[0] // 2], cfg)


def _up_rows(w, cfg):
    return transpose(w[w.shape[0] // 2:], cfg)


WEIGHT_MAP = {
    **{k: v for k, v in LLAMA_WEIGHT_MAP.items()
       if not any(p in k for p in (r"q_proj", r"k_proj", r"v_proj", r"gate_proj", r"up_proj"))},
    _LAYER + r"self_attn\.qkv_proj\.weight": [("layers.{0}.attn.q_proj", _q_rows),
                                              ("layers.{0}.attn.k_proj", _kv_rows(0)),
                                              ("layers.{0}.attn.v_proj", _kv_rows(1))],
    _LAYER + r"mlp\.gate_up_proj\.weight": [("layers.{0}.mlp.gate_proj", _gate_rows),
                                            ("layers.{0}.mlp.up_proj", _up_rows)],
}


def config_from_hf(hf: dict) -> ModelConfig:
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(key) or {})
    # Phi-4-mini (also Phi3ForCausalLM) ropes 3/4 of head_dim; 4.x configs keep it at the top level.
    rope["partial_rotary_factor"] = float(
        rope.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0)
    if rope.get("type") == "su":  # the first Phi-3-128k configs' name for longrope
        rope["type"] = "longrope"
    if rope.get("rope_type", rope.get("type")) == "longrope":
        # Phi-3 keeps the pretraining length at the top level of config.json.
        rope.setdefault("original_max_position_embeddings",
                        hf.get("original_max_position_embeddings"))
    hf = {**hf, key: rope or None}
    return base_config_from_hf(hf, sliding_window=hf.get("sliding_window") or None)


class Phi3(CausalLM):
    """Phi3ForCausalLM (the fused weights are split by WEIGHT_MAP; LongRoPE via the config)."""
