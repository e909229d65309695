"""`jaxserve merge-lora BASE ADAPTER OUT`: a PEFT LoRA adapter folded into its base checkpoint.

W' = W + scale * B @ A for every adapted weight (PEFT's lora_alpha / r, or / sqrt(r) for rsLoRA,
with rank_pattern / alpha_pattern), computed in f32 and stored in the weight's own dtype; every
other tensor and file is copied as it is. The result is a plain HF directory any engine loads.
Host-only (numpy + safetensors); no device is used.
"""
from __future__ import annotations

import os
import re
import shutil

import numpy as np

from jaxserve.lora import lora_scale, read_adapter_tensors

_ADAPTER_TENSOR = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight")


def adapter_deltas(adapter: str) -> dict[str, np.ndarray]:
    """{base weight name: f32 delta [out, in]} of a PEFT LoRA directory (ValueError naming a
    bad directory or tensor)."""

    def split(name: str) -> tuple[str, str]:
        m = _ADAPTER_TENSOR.fullmatch(name)
        if m is None:
            raise ValueError(f"LoRA adapter {adapter!r}: cannot merge tensor {name!r}")
        return m.group(1), m.group(2)

    cfg, pairs = read_adapter_tensors(adapter, split)
    return {module + ".weight": lora_scale(cfg, module, A.shape[0]) * (B @ A)
            for module, (A, B) in pairs.items()}


def merge_lora(base: str, adapter: str, out: str) -> list[str]:
    """Write BASE with ADAPTER merged into OUT (a new directory); returns the merged weights."""
    from safetensors.numpy import save_file

    from jaxserve.checkpoint import _safetensors_files, read_safetensors

    if os.path.exists(out):
        raise ValueError(f"merge-lora output {out!r} already exists")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ValueError(f"no config.json in base model directory {base!r}")
    deltas = adapter_deltas(adapter)
    files = _safetensors_files(base)
    os.makedirs(out)
    merged = []
    for file in files:
        tensors = {name: np.asarray(load()) for name, load in read_safetensors(file).items()}
        for name in set(tensors) & set(deltas):
            w = tensors[name]
            if w.shape != deltas[name].shape:
                raise ValueError(f"LoRA adapter {adapter!r}: delta {deltas[name].shape} for "
                                 f"{name} {w.shape}: another base model?")
            tensors[name] = (w.astype(np.float32) + deltas[name]).astype(w.dtype)
            merged.append(name)
        save_file(tensors, os.path.join(out, os.path.basename(file)), metadata={"format": "pt"})
    missing = sorted(set(deltas) - set(merged))
    if missing:
        shutil.rmtree(out)
        raise ValueError(f"LoRA adapter {adapter!r} adapts weights {base!r} lacks: {missing[:4]}")
    for name in os.listdir(base):  # config, tokenizer, generation config, shard index
        src = os.path.join(base, name)
        if os.path.isfile(src) and not name.endswith(".safetensors"):
            shutil.copy2(src, os.path.join(out, name))
    return sorted(merged)
