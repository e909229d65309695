"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2 attention (qkv biases), routed experts plus a
shared expert gated by sigmoid(x @ shared_expert_gate); layers in mlp_only_layers, or off the
decoder_sparse_step, keep a dense MLP of intermediate_size."""
from __future__ import annotations

from jaxserve.config import ModelConfig
from models.hf import (LLAMA_WEIGHT_MAP, QKV_BIAS_WEIGHT_MAP, Stacked, base_config_from_hf,
                       transpose)
from models.moe import STACKED_EXPERTS_WEIGHT_MAP, MoECausalLM, moe_config

_MOE = r"model\.layers\.(\d+)\.mlp\."
EXPERT_WEIGHT_MAP = {
    _MOE + r"gate\.weight": ("layers.{0}.mlp.router", transpose),  # [E, D] -> [D, E]
    _MOE + r"experts\.(\d+)\.gate_proj\.weight": ("layers.{0}.mlp.gate_proj", Stacked(transpose)),
    _MOE + r"experts\.(\d+)\.up_proj\.weight": ("layers.{0}.mlp.up_proj", Stacked(transpose)),
    _MOE + r"experts\.(\d+)\.down_proj\.weight": ("layers.{0}.mlp.down_proj", Stacked(transpose)),
    **STACKED_EXPERTS_WEIGHT_MAP,
}
SHARED_EXPERT_WEIGHT_MAP = {
    _MOE + r"shared_expert\.(gate|up|down)_proj\.weight":
        ("layers.{0}.mlp.shared_expert.{1}_proj", transpose),
    _MOE + r"shared_expert_gate\.weight":
        ("layers.{0}.mlp.shared_expert_gate", lambda w, cfg: w.reshape(-1)),  # [1, D] -> [D]
}
WEIGHT_MAP = {**LLAMA_WEIGHT_MAP, **QKV_BIAS_WEIGHT_MAP, **EXPERT_WEIGHT_MAP,
              **SHARED_EXPERT_WEIGHT_MAP}


def qwen_moe_fields(hf: dict) -> dict:
    """The expert fields Qwen2-MoE and Qwen3-MoE config.json share (transformers 5 writes
    Qwen3-MoE's num_experts as num_local_experts)."""
    num_experts = hf.get("num_experts") or hf.get("num_local_experts")
    if not num_experts:
        raise ValueError(f"{num_experts=}: a MoE config needs experts")
    return dict(num_experts=num_experts, num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
                decoder_sparse_step=hf.get("decoder_sparse_step") or 1)


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2-MoE use_sliding_window=True is not supported")
    base = base_config_from_hf(hf, qkv_bias=bool(hf.get("qkv_bias", True)))
    return moe_config(base, **qwen_moe_fields(hf),
                      shared_expert_intermediate_size=hf["shared_expert_intermediate_size"])


class Qwen2Moe(MoECausalLM):
    """Qwen2MoeForCausalLM."""
