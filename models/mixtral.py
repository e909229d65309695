"""Mixtral: Mistral attention with a top-2 mixture of 8 experts (softmax, top-k, renormalized)."""
from __future__ import annotations

from jaxserve.config import ModelConfig
from models.hf import LLAMA_WEIGHT_MAP, Stacked, base_config_from_hf, transpose
from models.moe import STACKED_EXPERTS_WEIGHT_MAP, MoECausalLM, moe_config

_MOE = r"model\.layers\.(\d+)\.block_sparse_moe\."
WEIGHT_MAP = {
    **{k: v for k, v in LLAMA_WEIGHT_MAP.items() if r"mlp\." not in k},
    _MOE + r"gate\.weight": ("layers.{0}.mlp.router", transpose),  # [E, D] -> [D, E]
    _MOE + r"experts\.(\d+)\.w1\.weight": ("layers.{0}.mlp.gate_proj", Stacked(transpose)),
    _MOE + r"experts\.(\d+)\.w3\.weight": ("layers.{0}.mlp.up_proj", Stacked(transpose)),
    _MOE + r"experts\.(\d+)\.w2\.weight": ("layers.{0}.mlp.down_proj", Stacked(transpose)),
    # GGUF (llama.cpp's "llama" arch with experts): the router and stacked experts
    r"model\.layers\.(\d+)\.mlp\.gate\.weight": ("layers.{0}.mlp.router", transpose),
    **STACKED_EXPERTS_WEIGHT_MAP,
}


def config_from_hf(hf: dict) -> ModelConfig:
    base = base_config_from_hf(hf, sliding_window=hf.get("sliding_window") or None)
    return moe_config(base, num_experts=hf["num_local_experts"],
                      num_experts_per_tok=hf.get("num_experts_per_tok", 2),
                      moe_intermediate_size=hf["intermediate_size"], norm_topk_prob=True)


class Mixtral(MoECausalLM):
    """MixtralForCausalLM: every layer sparse, no shared expert."""
