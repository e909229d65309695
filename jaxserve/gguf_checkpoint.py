"""GGUF files for checkpoint.read_gguf: llama.cpp metadata -> an HF-style config dict, llama.cpp
tensor names -> HF names, and lazy readers (dequantized f32, or a QuantizedHost for Q4_0/Q4_1/
Q4_K/Q8_0: models/gguf_quant.py) that undo llama.cpp's q/k row permutation. The Checkpoint
itself is built in checkpoint.py.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re

import numpy as np

from models.gguf_quant import GGUF_KEPT_TYPES, gguf_kept_host

logger = logging.getLogger("jaxserve")

_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
               "phi3": "Phi3ForCausalLM", "qwen2moe": "Qwen2MoeForCausalLM",
               "qwen3moe": "Qwen3MoeForCausalLM"}
# Per-architecture names checked before _GGUF_NAMES: experts stacked [E, out, in] (models/moe.py
# STACKED_EXPERTS_WEIGHT_MAP), Phi-3's fused qkv and gate+up (its ffn_up holds both).
_GGUF_MOE_NAMES = [
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", "model.layers.{0}.mlp.gate.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight",
     "model.layers.{0}.mlp.experts.{1}_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate_inp_shexp\.weight", "model.layers.{0}.mlp.shared_expert_gate.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight",
     "model.layers.{0}.mlp.shared_expert.{1}_proj.weight"),
]
_GGUF_ARCH_NAMES = {
    "MixtralForCausalLM": _GGUF_MOE_NAMES, "Qwen2MoeForCausalLM": _GGUF_MOE_NAMES,
    "Qwen3MoeForCausalLM": _GGUF_MOE_NAMES,
    "Phi3ForCausalLM": [
        (r"blk\.(\d+)\.attn_qkv\.weight", "model.layers.{0}.self_attn.qkv_proj.weight"),
        (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.gate_up_proj.weight"),
        (r"rope_factors_(long|short)\.weight", "rope_factors_{0}")],  # read into the config
}
# Gemma's four norms per layer (llama.cpp's ffn_norm is Gemma's pre-MLP norm, not Llama's
# post-attention one); checked before _GGUF_NAMES for gemma archs.
_GGUF_GEMMA_NAMES = [
    (r"blk\.(\d+)\.post_attention_norm\.weight",
     "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.pre_feedforward_layernorm.weight"),
    (r"blk\.(\d+)\.post_ffw_norm\.weight",
     "model.layers.{0}.post_feedforward_layernorm.weight"),
]
_GGUF_NAMES = [  # llama.cpp tensor name -> HF tensor name
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", "model.layers.{0}.self_attn.{1}_proj.{2}"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", "model.layers.{0}.self_attn.{1}_norm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", "model.layers.{0}.mlp.{1}_proj.weight"),
]


def gguf_metadata(reader) -> dict:
    """A gguf.GGUFReader's metadata fields as Python values, without the tokenizer's vocabulary
    arrays (tokenizer.ggml.*) except the special token ids."""
    return {k: _field_value(f) for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith("_token_id")}


def _field_value(f):
    try:
        return f.contents()
    except Exception:  # unusual field types: metadata we do not need
        return None


def gguf_config(reader, meta: dict) -> dict:
    """The HF-style config of a GGUF file: gguf_to_hf_config plus what only its tensors state
    (Gemma 3's vocab size, Phi-3's LongRoPE factors)."""
    hf = gguf_to_hf_config(meta, {t.name for t in reader.tensors})
    if hf["vocab_size"] is None:  # gemma3 GGUFs state it nowhere but in the embedding's shape
        hf["vocab_size"] = next(int(t.shape[-1]) for t in reader.tensors
                                if t.name == "token_embd.weight")
    if meta["general.architecture"] == "phi3":
        hf.update(_phi3_gguf_rope(reader, meta))
    return hf


def gguf_to_hf_config(meta: dict, tensor_names: set[str]) -> dict:
    """llama.cpp metadata ({arch}.embedding_length, ...) -> HF config.json fields; ValueError
    naming an unsupported general.architecture."""
    arch = meta["general.architecture"]
    if arch not in _GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(_GGUF_ARCHS)}")
    p = arch + "."
    hf = {"architectures": [_GGUF_ARCHS[arch]],
          "hidden_size": meta[p + "embedding_length"],
          "intermediate_size": meta[p + "feed_forward_length"],
          "num_hidden_layers": meta[p + "block_count"],
          "num_attention_heads": meta[p + "attention.head_count"],
          "num_key_value_heads": meta.get(p + "attention.head_count_kv"),
          "head_dim": meta.get(p + "attention.key_length"),
          "rms_norm_eps": meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6),
          "rope_theta": meta.get(p + "rope.freq_base", 10000.0),
          "max_position_embeddings": meta.get(p + "context_length", 4096),
          "vocab_size": meta.get(p + "vocab_size") or meta.get("tokenizer.ggml.vocab_size"),
          "tie_word_embeddings": "output.weight" not in tensor_names,
          "sliding_window": meta.get(p + "attention.sliding_window")}
    scaling = meta.get(p + "rope.scaling.type")
    if scaling not in (None, "none"):  # an unimplemented type fails at load (models/hf.py)
        rope = {"rope_type": scaling, "factor": meta.get(p + "rope.scaling.factor"),
                "original_max_position_embeddings": meta.get(
                    p + "rope.scaling.original_context_length")}
        hf["rope_scaling"] = {k: v for k, v in rope.items() if v is not None}
    if arch in ("gemma2", "gemma3"):
        hf.update(_gemma_gguf_config(meta, hf))
    if meta.get(p + "expert_count"):
        hf.update(_moe_gguf_config(meta, arch))
    if "rope_freqs.weight" in tensor_names:
        # TODO(models): Llama 3.1 GGUFs store llama3 rope factors as a tensor; not applied yet.
        logger.warning("GGUF rope_freqs tensor ignored: long-context rope scaling is not applied")
    return hf


def _moe_gguf_config(meta: dict, arch: str) -> dict:
    """Expert fields; llama.cpp's "llama" arch with experts is Mixtral. Renormalized top-k as
    llama.cpp builds each arch unless the file says (expert_weights_norm)."""
    p = arch + "."
    out = {"num_experts": meta[p + "expert_count"], "num_local_experts": meta[p + "expert_count"],
           "num_experts_per_tok": meta[p + "expert_used_count"],
           "moe_intermediate_size": meta.get(p + "expert_feed_forward_length"),
           "shared_expert_intermediate_size": meta.get(p + "expert_shared_feed_forward_length"),
           "norm_topk_prob": meta.get(p + "expert_weights_norm", arch != "qwen2moe")}
    if arch in ("llama", "mistral"):
        out["architectures"] = ["MixtralForCausalLM"]
    return out


def _phi3_gguf_rope(reader, meta: dict) -> dict:
    """Phi-3's LongRoPE: the factors are tensors (rope_factors_long/short) in llama.cpp's GGUF."""
    factors = {t.name.split("_")[2].split(".")[0]: np.asarray(t.data, np.float64).tolist()
               for t in reader.tensors if t.name.startswith("rope_factors_")}
    original = meta.get("phi3.rope.scaling.original_context_length")
    head_dim = meta["phi3.embedding_length"] // meta["phi3.attention.head_count"]
    out = {"original_max_position_embeddings": original,  # Phi-4-mini ropes 3/4 of head_dim
           "partial_rotary_factor": meta.get("phi3.rope.dimension_count", head_dim) / head_dim}
    if not factors:
        return out
    return {**out, "rope_scaling": {
        "rope_type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
        "attention_factor": meta.get("phi3.rope.scaling.attn_factor")}}


def _gemma_gguf_config(meta: dict, hf: dict) -> dict:
    """Gemma fields GGUF leaves to llama.cpp's code (llama-model.cpp): 1/sqrt(hidden/heads) as
    the softmax scale on the 27B models (Gemma 2: 46 layers, Gemma 3: 62), else 1/sqrt(head_dim);
    Gemma 3's sliding layers: every 6th layer global, local rope base 10000."""
    arch = meta["general.architecture"]
    p = arch + "."
    big = hf["num_hidden_layers"] == {"gemma2": 46, "gemma3": 62}[arch]
    head_dim = hf["head_dim"] or hf["hidden_size"] // hf["num_attention_heads"]
    out = {"query_pre_attn_scalar": (hf["hidden_size"] // hf["num_attention_heads"]) if big
           else head_dim}
    if arch == "gemma2":
        out.update(attn_logit_softcapping=meta.get(p + "attn_logit_softcapping"),
                   final_logit_softcapping=meta.get(p + "final_logit_softcapping"))
    else:
        out.update(sliding_window_pattern=6, rope_local_base_freq=10000.0)
    return out


def gguf_tensors(reader, hf: dict, permute: bool):
    """(HF name -> lazy f32 array, HF name -> lazy QuantizedHost for the 2-D tensors of a
    GGUF_KEPT_TYPES type (Q4_0/Q4_1/Q4_K int4, Q8_0 int8), HF name -> GGUF type name); q/k weights
    un-permuted when llama.cpp permuted them (scales and zeros with their rows); Gemma's norms
    stored as 1 + w by llama.cpp, shifted back to HF's w."""
    from gguf.quants import dequantize

    gemma = hf["architectures"][0] in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
    names = ((_GGUF_GEMMA_NAMES if gemma else []) + _GGUF_ARCH_NAMES.get(hf["architectures"][0], [])
             + _GGUF_NAMES)
    compiled = [(re.compile(p), target) for p, target in names]
    out, kept, types = {}, {}, {}
    for t in reader.tensors:
        for pattern, target in compiled:
            if (m := pattern.fullmatch(t.name)) is not None:
                name = target.format(*m.groups())
                break
        else:
            logger.warning("GGUF tensor %s ignored", t.name)
            continue
        heads = {"q_proj.weight": hf["num_attention_heads"],
                 "k_proj.weight": hf["num_key_value_heads"] or hf["num_attention_heads"]}
        num_heads = heads.get(name.rsplit("self_attn.", 1)[-1]) if permute else None

        shift = 1.0 if gemma and name.endswith("norm.weight") else 0.0

        def load(t=t, num_heads=num_heads, shift=shift):
            w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            if num_heads:
                w = _unpermute_rope(w, num_heads)
            return w - shift if shift else w

        out[name] = load
        types[name] = t.tensor_type.name
        if types[name] in GGUF_KEPT_TYPES and len(t.shape) == 2:
            kept[name] = functools.partial(_load_kept, t, num_heads)
    return out, kept, types


def _load_kept(t, num_heads: int | None):
    """One Q4/Q8_0 GGUF tensor -> QuantizedHost [O, I] (models.gguf_quant.gguf_kept_host),
    un-permuted."""
    host = gguf_kept_host(t.data, t.tensor_type.name, int(t.shape[0]))
    if num_heads:
        host = dataclasses.replace(host, **{k: _unpermute_rope(getattr(host, k), num_heads)
                                            for k in ("values", "scales", "zeros")
                                            if getattr(host, k) is not None})
    return host


def _unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf q/k permutation (interleaved -> HF rotate-half rows).

    llama.cpp stores each head's rows as (H/2, 2) pairs; HF as (2, H/2) halves.
    """
    rows = w.shape[0]
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))
