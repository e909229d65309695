"""Qwen3-MoE: Qwen3 attention (q/k RMSNorm) with many small routed experts and no shared expert."""
from __future__ import annotations

from jaxserve.config import ModelConfig
from models.hf import LLAMA_WEIGHT_MAP, QK_NORM_WEIGHT_MAP, base_config_from_hf
from models.moe import MoECausalLM, moe_config
from models.qwen2_moe import EXPERT_WEIGHT_MAP, qwen_moe_fields

WEIGHT_MAP = {**LLAMA_WEIGHT_MAP, **QK_NORM_WEIGHT_MAP, **EXPERT_WEIGHT_MAP}


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen3-MoE use_sliding_window=True is not supported")
    base = base_config_from_hf(hf, qk_norm=True)
    return moe_config(base, **qwen_moe_fields(hf))


class Qwen3Moe(MoECausalLM):
    """Qwen3MoeForCausalLM (Qwen3-30B-A3B: 128 experts, top-8, norm_topk_prob)."""
