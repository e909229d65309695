"""Model registry: HF `architectures[0]` -> our NNX class, imported lazily.

Adding a model = one file under models/ plus one REGISTRY line.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from jaxserve.config import ModelConfig

REGISTRY = {
    "Gemma2ForCausalLM": "models.gemma2:Gemma2",
    "Gemma3ForCausalLM": "models.gemma3:Gemma3",
    # Refused by models.gemma3.config_from_hf with the reason (its vision tower is not implemented).
    "Gemma3ForConditionalGeneration": "models.gemma3:Gemma3",
    "LlamaForCausalLM": "models.llama:Llama",
    "MistralForCausalLM": "models.mistral:Mistral",
    "MixtralForCausalLM": "models.mixtral:Mixtral",
    "Phi3ForCausalLM": "models.phi3:Phi3",
    "Qwen2ForCausalLM": "models.qwen2:Qwen2",
    "Qwen2MoeForCausalLM": "models.qwen2_moe:Qwen2Moe",
    "Qwen3ForCausalLM": "models.qwen3:Qwen3",
    "Qwen3MoeForCausalLM": "models.qwen3_moe:Qwen3Moe",
}


def _module(arch: str) -> tuple[ModuleType, str]:
    if arch not in REGISTRY:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(sorted(REGISTRY))}")
    module_name, class_name = REGISTRY[arch].split(":")
    return importlib.import_module(module_name), class_name


def get_model_class(arch: str) -> type:
    """REGISTRY class for an HF architecture name; ValueError listing the supported ones."""
    module, class_name = _module(arch)
    return getattr(module, class_name)


def get_weight_map(arch: str) -> dict:
    """The architecture's WEIGHT_MAP: HF name regex -> (param path, transform)."""
    return _module(arch)[0].WEIGHT_MAP


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if not archs:
        raise ValueError(f"HF config has no 'architectures'; supported: {', '.join(sorted(REGISTRY))}")
    return archs[0]


def merge_hf_overrides(hf: dict, hf_overrides: dict | None) -> dict:
    """hf_overrides merged on top of config.json. A transformers-5 config keeps its rope in
    `rope_parameters`, which the readers prefer to the 4.x `rope_theta` / `rope_scaling` keys, so
    overrides of those two go into it (else they would be silently ignored); a per-layer-type
    `rope_parameters` (Gemma 3) is ambiguous for them: override `rope_parameters` itself."""
    overrides = dict(hf_overrides or {})
    params = hf.get("rope_parameters")
    rope_keys = [k for k in ("rope_theta", "rope_scaling") if k in overrides]
    if params and rope_keys and "rope_parameters" not in overrides:
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"hf_overrides {rope_keys} cannot apply to a config whose "
                             f"rope_parameters are per layer type ({sorted(params)}): override "
                             "rope_parameters instead")
        merged = dict(params)
        if "rope_scaling" in overrides:
            merged = {"rope_theta": params.get("rope_theta"), **(overrides["rope_scaling"] or {})}
            if merged["rope_theta"] is None:
                del merged["rope_theta"]
        if "rope_theta" in overrides:
            merged["rope_theta"] = overrides["rope_theta"]
        overrides["rope_parameters"] = merged
    return {**hf, **overrides}


def config_from_hf(hf: dict, hf_overrides: dict | None = None) -> ModelConfig:
    """HF config.json dict (with hf_overrides merged on top) -> ModelConfig."""
    hf = merge_hf_overrides(hf, hf_overrides)
    module, _ = _module(architecture_of(hf))
    return module.config_from_hf(hf)
