"""Gemma 3 (text): Gemma 2's blocks plus q/k (1 + w) RMSNorm, five sliding layers per global one
by default, and the sliding layers' own rope base (rope_local_base_freq, no scaling). No soft caps
unless the config sets them. The multimodal Gemma3ForConditionalGeneration is refused.
"""
from __future__ import annotations

import dataclasses

from models.gemma2 import WEIGHT_MAP as GEMMA2_WEIGHT_MAP
from models.gemma2 import Gemma2, GemmaConfig, check_gemma_hf, gemma_layer_types
from models.hf import QK_NORM_WEIGHT_MAP, base_config_from_hf

WEIGHT_MAP = {**GEMMA2_WEIGHT_MAP, **QK_NORM_WEIGHT_MAP}
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # HF's defaults


def _rope(hf: dict) -> tuple[dict, float]:
    """(global rope fields for base_config_from_hf, local rope theta) from HF 4.x (rope_theta,
    rope_scaling, rope_local_base_freq) or 5.x (rope_parameters per layer type) configs."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"Gemma 3 sliding-layer rope {local} is not supported (default only)")
        full.setdefault("rope_theta", DEFAULT_THETA["full_attention"])
        return ({"rope_parameters": full},
                local.get("rope_theta", DEFAULT_THETA["sliding_attention"]))
    return ({"rope_theta": hf.get("rope_theta", DEFAULT_THETA["full_attention"]),
             "rope_scaling": hf.get("rope_scaling"), "rope_parameters": params or None},
            hf.get("rope_local_base_freq", DEFAULT_THETA["sliding_attention"]))


def config_from_hf(hf: dict) -> GemmaConfig:
    if "text_config" in hf or "vision_config" in hf:
        raise ValueError(
            f"{hf.get('architectures')} is Gemma 3 with a SigLIP vision tower (vision_config, "
            "multi_modal_projector), which jaxserve does not implement; serve a text-only Gemma 3 "
            "(Gemma3ForCausalLM, e.g. google/gemma-3-1b-it or gemma-3-270m)")
    check_gemma_hf(hf)
    rope, local_theta = _rope(hf)
    base = base_config_from_hf({**hf, **rope}, qk_norm=True,
                               sliding_window=hf.get("sliding_window", 4096),
                               attn_logits_soft_cap=hf.get("attn_logit_softcapping"))
    return GemmaConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                       layer_types=gemma_layer_types(hf, hf.get("sliding_window_pattern") or 6),
                       query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                       final_logit_soft_cap=hf.get("final_logit_softcapping"),
                       rope_local_theta=float(local_theta))


class Gemma3(Gemma2):
    """Gemma3ForCausalLM (qk_norm=True and the local rope base via the config)."""
