"""Mistral: Llama with sliding-window attention (v0.1: 4096)."""
from __future__ import annotations

from jaxserve.config import ModelConfig
from models.hf import LLAMA_WEIGHT_MAP, base_config_from_hf
from models.layers import CausalLM

WEIGHT_MAP = LLAMA_WEIGHT_MAP


def config_from_hf(hf: dict) -> ModelConfig:
    return base_config_from_hf(hf, sliding_window=hf.get("sliding_window") or None)


class Mistral(CausalLM):
    """MistralForCausalLM (sliding_window via the config)."""
