"""LoRA on a GGUF base kept quantized (quantization="gguf"): the adapter slots are added to the
model with each projection in its own format (Q4 int4, Q8_0 int8, the rest expanded), so a
Q4_K_M-like file serves adapters; with an adapter it gives what the same adapter gives on the
fully expanded load (the weights agree to ~1e-7 relative, float32)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_gguf_quant import HF_NAMES, LAYER_TYPES, SHAPES, needs_smollm2, write_mixed_gguf

from jaxserve import LLM, LoRARequest, SamplingParams
from jaxserve.checkpoint import embedded_gguf_path

pytest.importorskip("gguf")


def write_adapter(path, rank: int = 8, seed: int = 0) -> str:
    """A PEFT-layout LoRA on every projection of both layers, random non-zero A and B."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(len(LAYER_TYPES)):
        for name, hf in HF_NAMES.items():
            out_features, in_features = SHAPES[name]
            prefix = f"base_model.model.model.layers.{layer}.{hf}"
            tensors[f"{prefix}.lora_A.weight"] = (
                rng.standard_normal((rank, in_features)) * 0.05).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (
                rng.standard_normal((out_features, rank)) * 0.05).astype(np.float32)
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": sorted({hf.split(".")[1] for hf in HF_NAMES.values()})}))
    return str(path)


@needs_smollm2
def test_lora_on_a_quantized_gguf_equals_lora_on_the_expanded_load(tmp_path):
    gguf_path = write_mixed_gguf(str(tmp_path / "mixed.gguf"))
    adapter = LoRARequest("a", 1, write_adapter(tmp_path / "adapter"))
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
    prompts = [[3, 17, 40, 8, 91], [5, 9, 1]]
    runs = {}
    for quantization in (None, "gguf"):
        llm = LLM(gguf_path, quantization=quantization, tokenizer=embedded_gguf_path(),
                  dtype="float32", enable_lora=True, max_lora_rank=8, max_model_len=64,
                  num_kv_pages=64, page_size=4)
        runs[quantization] = [llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
                              for lora in (None, adapter)]
    expanded, quantized = sum(runs[None], []), sum(runs["gguf"], [])  # base rows, adapter rows
    for want, got in zip(expanded, quantized):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        lp_want = [step[t].logprob for step, t in zip(want.outputs[0].logprobs,
                                                     want.outputs[0].token_ids)]
        lp_got = [step[t].logprob for step, t in zip(got.outputs[0].logprobs,
                                                    got.outputs[0].token_ids)]
        np.testing.assert_allclose(lp_got, lp_want, atol=1e-4)
    # The adapter changes the output (else the comparison above would not test it).
    assert ([o.outputs[0].token_ids for o in runs["gguf"][0]]
            != [o.outputs[0].token_ids for o in runs["gguf"][1]]
            or [o.outputs[0].cumulative_logprob for o in runs["gguf"][0]]
            != [o.outputs[0].cumulative_logprob for o in runs["gguf"][1]])
