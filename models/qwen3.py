"""Qwen3 (dense): Llama with RMSNorm on q and k over head_dim and an explicit head_dim."""
from __future__ import annotations

from jaxserve.config import ModelConfig
from models.hf import LLAMA_WEIGHT_MAP, QK_NORM_WEIGHT_MAP, base_config_from_hf
from models.layers import CausalLM

WEIGHT_MAP = {**LLAMA_WEIGHT_MAP, **QK_NORM_WEIGHT_MAP}


def config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen3 use_sliding_window=True is not supported")
    return base_config_from_hf(hf, qk_norm=True)


class Qwen3(CausalLM):
    """Qwen3ForCausalLM (qk_norm=True via the config)."""
