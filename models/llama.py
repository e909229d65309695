"""Llama 2/3/3.1 (and SmolLM2, which is Llama): the base CausalLM with HF rope scaling."""
from __future__ import annotations

from jaxserve.config import ModelConfig
from models.hf import LLAMA_WEIGHT_MAP, base_config_from_hf
from models.layers import CausalLM

WEIGHT_MAP = LLAMA_WEIGHT_MAP


def config_from_hf(hf: dict) -> ModelConfig:
    return base_config_from_hf(hf)


class Llama(CausalLM):
    """LlamaForCausalLM; rope_scaling ("linear", "llama3", "yarn") comes in through the config."""
