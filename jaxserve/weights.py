"""Weights -> placed NNX state: build the model abstractly on the mesh, then create every param
directly on its sharding from a lazily read checkpoint tensor (or random for load_format="dummy").

startup.py calls load_model once; the runner jits over (graphdef, state).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxserve.checkpoint import Checkpoint, embedded_gguf_path, load_tokenizer, open_checkpoint
from jaxserve.hub import is_hub_spec, resolve_model
from jaxserve.config import DTYPES, LOAD_FORMATS, ModelConfig
from jaxserve.sharding import ShardingRules, make_mesh
from models import architecture_of, config_from_hf, get_model_class, get_weight_map
from models.hf import map_weight_names
from models.layers import longrope_for_context
from models.gguf_quant import GGUF_GROUP, GGUF_KEPT_TYPES
from models.linear import set_projection_formats
from models.quant import (QUANT_LEAVES, QuantizedHost, QuantMethod, check_fp8_devices,
                          linear_arrays, method_from_hf)

logger = logging.getLogger("jaxserve")


@dataclass
class LoadedModel:
    config: ModelConfig  # after with_kv_replication(tensor_parallel_size)
    graphdef: nnx.GraphDef
    state: nnx.State  # params as jax.Arrays on their NamedShardings
    tokenizer: object  # transformers PreTrainedTokenizerFast
    eos_token_ids: frozenset[int]
    chat_template: str | None
    dtype: jnp.dtype  # param (and default KV cache) dtype
    max_model_len: int
    model_name: str
    mesh: Mesh
    generation_config: dict  # the checkpoint's generation_config.json ({} if none)
    formats: dict[str, str] | None = None  # GGUF: projection path -> its device format


def load_model(model: str | None, *, load_format: str = "auto", dtype: str = "auto",
               tensor_parallel_size: int = 1, mesh: Mesh | None = None,
               rules: ShardingRules = ShardingRules(), max_model_len: int | None = None,
               seed: int = 0, hf_overrides=None, tokenizer: str | None = None,
               revision: str | None = None, download_dir: str | None = None,
               quantization: str | None = None) -> LoadedModel:
    """Load `model` onto `mesh` (default: make_mesh(tensor_parallel_size)).

    model: HF directory (config.json + safetensors), a .gguf file, a hub repo id (`org/name`,
      `org/name:QUANT` or `org/name/file.gguf`; the HF cache first, then a download), None for the
      embedded SmolLM2-135M-Instruct GGUF, or with load_format="dummy" a preset name or repo id
      from models/presets.py (the tokenizer is then the embedded SmolLM2 one).
    load_format: "auto" | "safetensors" | "gguf" | "dummy" (random uniform(-1e-3, 1e-3) weights;
      the only way random weights are ever loaded).
    dtype: "auto" = the checkpoint's torch_dtype; for quantized GGUF f32 on CPU, bf16 elsewhere.
    max_model_len: None = the model's max_position_embeddings; above it is a ValueError (vLLM's).
    hf_overrides: dict (or tuple of pairs) merged over the HF config before parsing.
    tokenizer: a directory, .gguf file or hub repo id to take the tokenizer from instead.
    revision, download_dir: the hub revision of `model` and the cache directory for downloads.
    quantization: None (the checkpoint's quantization_config, if any), "fp8" (an FP8 checkpoint,
      or a float one quantized at load), "awq" / "gptq" (int4 checkpoints; random with dummy),
      "gguf" (a .gguf file's Q4_0/Q4_1/Q4_K projections kept int4, Q8_0 int8, the rest expanded).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"{load_format=} must be one of {LOAD_FORMATS}")
    if dtype not in DTYPES:
        raise ValueError(f"{dtype=} must be one of {DTYPES}")
    ckpt = open_checkpoint(model, load_format, revision=revision, download_dir=download_dir)
    overrides = dict(hf_overrides or {})
    base = config_from_hf(ckpt.hf_config, overrides)
    max_model_len = check_max_model_len(max_model_len, base.max_position_embeddings)
    base = longrope_for_context(base, max_model_len)  # Phi-3's LongRoPE factors follow it
    config = base.with_kv_replication(tensor_parallel_size)
    method = _quant_method(ckpt, quantization, load_format)
    if method is not None:
        config = dataclasses.replace(config, quantization=method.weight_format,
                                     quant_group_size=method.group_size)
    param_dtype = resolve_dtype(dtype, ckpt)
    mesh = mesh if mesh is not None else make_mesh(tensor_parallel_size)
    if method is not None and method.weight_format == "fp8":
        check_fp8_devices(mesh.devices.flat)
    formats = _gguf_formats(ckpt, config) if method and method.name == "gguf" else None
    graphdef, abstract, shardings = abstract_model(config, param_dtype, mesh, rules,
                                                   formats=formats)
    start = time.perf_counter()
    if load_format == "dummy":
        state = _random_state(abstract, shardings, seed)
    else:
        state = _checkpoint_state(ckpt, config, abstract, shardings, method)
    jax.block_until_ready(jax.tree.leaves(state))
    weights_s, start = time.perf_counter() - start, time.perf_counter()
    tok = load_tokenizer(_tokenizer_path(tokenizer, download_dir) or ckpt.tokenizer_path
                         or embedded_gguf_path())
    logger.info("weights on device in %.1fs (%s), tokenizer loaded in %.1fs", weights_s,
                load_format, time.perf_counter() - start)
    # The checkpoint's own eos ids win (config.json / generation_config.json / GGUF metadata);
    # the tokenizer's eos_token is only a fallback.
    eos = set(ckpt.eos_token_ids) or ({tok.eos_token_id} - {None})
    return LoadedModel(
        config=config, graphdef=graphdef, state=state, tokenizer=tok,
        eos_token_ids=frozenset(eos), chat_template=ckpt.chat_template or tok.chat_template,
        dtype=param_dtype, max_model_len=max_model_len, model_name=ckpt.name, mesh=mesh,
        generation_config=ckpt.generation_config, formats=formats)


def _quant_method(ckpt: Checkpoint, requested: str | None, load_format: str
                  ) -> QuantMethod | None:
    """models.quant.method_from_hf; dummy weights take awq/gptq's layout without a checkpoint
    (group size 128), so the int4 path can be benchmarked on presets. "gguf" needs a GGUF file
    holding at least one Q4_0/Q4_1/Q4_K/Q8_0 tensor (group size 32)."""
    if load_format == "dummy" and requested in ("awq", "gptq"):
        return QuantMethod(requested)
    if requested == "gguf" and ckpt.gguf_types:
        if not any(t in GGUF_KEPT_TYPES for t in ckpt.gguf_types.values()):
            raise ValueError(f"quantization='gguf': {ckpt.name!r} has no Q4_0/Q4_1/Q4_K/Q8_0 "
                             f"tensors (types {sorted(set(ckpt.gguf_types.values()))}); leave "
                             f"quantization unset to load it expanded")
        return QuantMethod("gguf", group_size=GGUF_GROUP)
    return method_from_hf(ckpt.hf_config, requested)


def _gguf_formats(ckpt: Checkpoint, config: ModelConfig) -> dict[str, str]:
    """Param path -> device format of the projections kept quantized (GGUF_KEPT_TYPES: Q4_0/Q4_1/
    Q4_K int4_f32, Q8_0 int8_g32); the other projections (Q6_K, F16, ...) are built as plain
    params and expanded. Logged."""
    weight_map = get_weight_map(architecture_of({"architectures": [config.architecture]}))
    mapped, _ = map_weight_names(ckpt.gguf_types, weight_map)
    kept, expanded = {}, {}
    for path, (hf_name, _) in mapped.items():
        if isinstance(hf_name, str) and hf_name.endswith("_proj.weight"):
            t = ckpt.gguf_types[hf_name]
            side = kept if t in GGUF_KEPT_TYPES else expanded
            side.setdefault(t, []).append(path)
    count = lambda d: ", ".join(f"{t} {len(p)}" for t, p in sorted(d.items())) or "none"
    logger.info("quantization=gguf: %d projections kept quantized (%s: Q4 as int4, Q8_0 as "
                "int8), %d expanded to the param dtype (%s)", sum(map(len, kept.values())),
                count(kept), sum(map(len, expanded.values())), count(expanded))
    return {p: GGUF_KEPT_TYPES[t] for t, paths in kept.items() for p in paths}


def check_max_model_len(max_model_len: int | None, limit: int) -> int:
    """None -> the model's max_position_embeddings; above it is a ValueError, as in vLLM (rope
    and the model's training stop there; hf_overrides can raise the limit deliberately)."""
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"{max_model_len=} exceeds the model's max_position_embeddings={limit}; "
                         f"lower it, or raise the limit deliberately with hf_overrides="
                         f"{{'max_position_embeddings': {max_model_len}}}")
    return max_model_len or limit


def _tokenizer_path(tokenizer: str | None, download_dir: str | None) -> str | None:
    """A tokenizer given as a hub repo id resolves through the HF cache like the model."""
    if tokenizer is None or os.path.exists(tokenizer) or not is_hub_spec(tokenizer):
        return tokenizer
    return resolve_model(tokenizer, download_dir=download_dir, weights=False)


def resolve_dtype(dtype: str, ckpt: Checkpoint) -> jnp.dtype:
    """dtype="auto": the checkpoint's own float dtype (bf16 when unknown); quantized GGUF -> f32 on
    CPU (bf16 matmuls are slow there) and bf16 on accelerators."""
    if dtype != "auto":
        return jnp.dtype(dtype)
    if ckpt.native_dtype is None:  # quantized GGUF
        return jnp.dtype("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return jnp.dtype(ckpt.native_dtype)


def abstract_model(config: ModelConfig, dtype, mesh: Mesh, rules: ShardingRules, *,
                   formats: dict[str, str] | None = None):
    """(graphdef, abstract state of ShapeDtypeStructs, matching state of NamedShardings).
    formats (GGUF): path -> format of the projections kept quantized; the others become plain
    params (models.linear.set_projection_formats)."""
    cls = get_model_class(config.architecture)

    def build():
        model = cls(config, dtype=dtype, rngs=nnx.Rngs(0))
        if formats is not None:
            set_projection_formats(model, formats, dtype, nnx.Rngs(0))
        return model

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules.as_pairs()):
        model = nnx.eval_shape(build)
        graphdef, abstract = nnx.split(model)
        shardings = nnx.get_named_sharding(abstract, mesh)
    return graphdef, abstract, shardings


def _flat(state: nnx.State) -> list[tuple[str, nnx.Variable]]:
    return [(".".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def _checkpoint_state(ckpt: Checkpoint, config: ModelConfig, abstract: nnx.State,
                      shardings: nnx.State, method: QuantMethod | None = None) -> nnx.State:
    """Each param: read its HF tensor, transform to our layout, cast, and place shard by shard.
    A quantized projection (models/linear.py QuantLinear) is one mapped path owning several
    leaves (models/quant.py QUANT_LEAVES), filled together by quant.linear_arrays."""
    weight_map = get_weight_map(architecture_of({"architectures": [config.architecture]}))
    if not ckpt.tensors:
        raise ValueError(f"checkpoint {ckpt.name!r} holds no tensors (load_format='dummy' gives "
                         f"random weights)")
    mapped, unmatched = map_weight_names(ckpt.tensors, weight_map)
    if unmatched:
        logger.info("ignoring checkpoint tensors: %s", unmatched[:8])
    targets = dict(_flat(shardings))
    params, quantized = _split_quantized(_flat(abstract))
    missing = [path for path, _ in params + list(quantized.items()) if path not in mapped]
    if missing:
        raise ValueError(f"checkpoint {ckpt.name!r} lacks tensors for params {missing[:8]}")
    for path, var in tqdm(params, desc="loading weights", unit="tensor"):
        hf_name, transform = mapped[path]
        if isinstance(hf_name, tuple):  # one tensor per expert, stacked (models.hf.Stacked)
            host = transform([_read_float(ckpt, n) for n in hf_name], config)
        else:
            host = transform(_read_float(ckpt, hf_name), config)
        if tuple(host.shape) != tuple(var.get_value().shape):
            raise ValueError(f"{hf_name}: shape {host.shape} after transform, param {path} "
                             f"expects {var.get_value().shape}")
        var.set_value(_place(host, var.get_value().dtype, targets[path].get_value()))
    for path, leaves in tqdm(quantized.items(), desc="quantized weights", unit="tensor",
                             disable=not quantized):
        hf_name, transform = mapped[path]
        # A GGUF's Q4/Q8_0 projections stay quantized only for quantization="gguf"; fp8 (or
        # anything else) quantizes their float dequantization.
        kept = ckpt.int4_tensors.get(hf_name) if method.name == "gguf" else None
        read = kept or ckpt.tensors[hf_name]
        arrays = linear_arrays(read(), transform, config, method,
                               leaves["qweight"].get_value().shape)
        for leaf, var in leaves.items():
            if arrays[leaf].shape != var.get_value().shape:
                raise ValueError(f"{hf_name}: {leaf} shape {arrays[leaf].shape}, param "
                                 f"{path}.{leaf} expects {var.get_value().shape}")
            var.set_value(_place(arrays[leaf], var.get_value().dtype,
                                 targets[f"{path}.{leaf}"].get_value()))
    return abstract


def _split_quantized(params: list[tuple[str, nnx.Variable]]):
    """(plain params, {quantized projection path: {leaf name: var}})."""
    plain, quantized = [], {}
    for path, var in params:
        base, _, leaf = path.rpartition(".")
        if leaf in QUANT_LEAVES:
            quantized.setdefault(base, {})[leaf] = var
        else:
            plain.append((path, var))
    return plain, quantized


def _read_float(ckpt: Checkpoint, hf_name: str) -> np.ndarray:
    """A checkpoint tensor as floats: quantized ones (an fp8 lm_head, MoE experts, which stay in
    the param dtype) are dequantized here."""
    raw = ckpt.tensors[hf_name]()
    return raw.dequantize() if isinstance(raw, QuantizedHost) else raw


def _place(host: np.ndarray, dtype, sharding) -> jax.Array:
    """Create a sharded array from a host tensor; each device copies only its own slice.

    Always a fresh host copy: the CPU backend may alias aligned numpy buffers, and `host` can be
    a view of a memory-mapped checkpoint file.
    """
    np_dtype = np.dtype(dtype)
    return jax.make_array_from_callback(
        host.shape, sharding, lambda idx: np.array(host[idx], dtype=np_dtype, order="C", copy=True))


def _random_state(abstract: nnx.State, shardings: nnx.State, seed: int) -> nnx.State:
    """vLLM-style dummy weights: uniform(-1e-3, 1e-3), norm scales 1, made on device. One filler
    per distinct (shape, dtype, sharding), compiled in parallel first: compiled one by one they
    took most of the ~33 s a dummy Llama-3-8B needed on the H100."""
    targets = dict(_flat(shardings))
    key = jax.random.key(seed)
    params = _flat(abstract)
    specs = [(var.get_value().shape, var.get_value().dtype, targets[path].get_value(),
              path.endswith(".scale")) for path, var in params]
    unique = list(dict.fromkeys(specs))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, len(unique))) as pool:
        fills = dict(zip(unique, pool.map(lambda s: _filler(*s).lower(key).compile(), unique)))
    logger.info("dummy weights: %d fillers compiled in %.1fs", len(unique),
                time.perf_counter() - start)
    for i, ((path, var), spec) in enumerate(tqdm(list(zip(params, specs)), desc="dummy weights",
                                                 unit="tensor")):
        var.set_value(fills[spec](jax.random.fold_in(key, i)))
    return abstract


def _filler(shape, dtype, sharding, ones: bool):
    def fill(key):
        if ones:
            return jnp.ones(shape, dtype)
        return jax.random.uniform(key, shape, jnp.float32, -1e-3, 1e-3).astype(dtype)

    return jax.jit(fill, out_shardings=sharding)
