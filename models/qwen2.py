"""Qwen2 / Qwen2.5: Llama with biases on the q/k/v projections."""
from __future__ import annotations

from jaxserve.config import ModelConfig
from models.hf import LLAMA_WEIGHT_MAP, QKV_BIAS_WEIGHT_MAP, base_config_from_hf
from models.layers import CausalLM

WEIGHT_MAP = {**LLAMA_WEIGHT_MAP, **QKV_BIAS_WEIGHT_MAP}


def config_from_hf(hf: dict) -> ModelConfig:
    # Qwen2's sliding window is only active with use_sliding_window=True (off in every released
    # checkpoint) and then only above max_window_layers; we support the all-full-attention case.
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 use_sliding_window=True is not supported")
    return base_config_from_hf({**hf, "attention_bias": False}, qkv_bias=True)


class Qwen2(CausalLM):
    """Qwen2ForCausalLM (qkv_bias=True via the config)."""
