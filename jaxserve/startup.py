"""Engine start-up: mesh, weights, KV-cache sizing and the model runner, in that order.

The one place that turns an EngineConfig into device state; LLMEngine keeps the result.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import subprocess
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxserve.checkpoint import read_generation_config
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.kv_cache import init_kv_cache, kv_cache_bytes_per_page
from jaxserve.runner import ModelRunner
from jaxserve.sharding import ShardingRules, kv_cache_sharding, make_mesh
from kernels_pallas.ragged_paged_attention import default_impl

logger = logging.getLogger("jaxserve")

# Host memory assumed free for the KV cache when the device reports no memory stats (CPU).
_CPU_KV_BUDGET_BYTES = 2 << 30


@dataclass
class EngineParts:
    model_config: ModelConfig
    model_name: str
    tokenizer: object
    chat_template: str | None
    eos_token_ids: frozenset[int]
    max_model_len: int
    num_kv_pages: int
    runner: ModelRunner
    sampling_defaults: dict  # SamplingParams fields from generation_config.json (--generation-config)
    config: EngineConfig  # the caller's, with the batch limits it left to the device filled in


# XLA's own temporaries beyond the estimate above: on the H200 (2026-11-29) dummy Llama-3-8B with
# max_num_seqs 64 and max_model_len 1024 failed to compile a warm-up step for want of 1018 MiB.
_XLA_WORKSPACE_BYTES = 2 << 30


_LARGE_DEVICE_BYTES = 70 << 30  # vLLM's threshold for its larger batch defaults (H100, H200, MI300)


def device_memory(device, gpu_memory_utilization: float) -> tuple[int, int] | None:
    """(limit, in use) bytes for the KV pool's sizing: the allocator's memory_stats when it reports
    them (JAX's BFC allocator: its limit is gpu_memory_utilization of the device, see
    reserve_device_memory); else, on a GPU whose allocator reports none (XLA's VMM allocator, which
    --xla_gpu_command_buffer_update_mode=SKIP_TEMP selects), gpu_memory_utilization of the device's
    total (nvidia-smi) and the bytes of the arrays alive on it; None when neither is known."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"], stats["bytes_in_use"]
    if device.platform != "gpu":
        return None
    total = gpu_total_bytes()
    if total is None:
        return None
    in_use = sum(shard.data.nbytes for array in jax.live_arrays()
                 for shard in array.addressable_shards if shard.device == device)
    return int(total * gpu_memory_utilization), in_use


@functools.cache  # asked by batch_defaults and num_kv_pages_for: run nvidia-smi once
def gpu_total_bytes() -> int | None:
    """The smallest GPU's memory on this host (nvidia-smi), or None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True, timeout=30, check=True)
        return min(int(line) for line in out.stdout.split()) << 20  # MiB
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def batch_defaults(config: EngineConfig, device) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) where the config leaves them to the device, as vLLM
    does: offline (`LLM`) on an accelerator with >= 70 GiB, 1024 and 16384; otherwise, and for the
    server (which keeps a smaller step for latency: issue 14), 256 and 2048."""
    # CPU devices are not asked: calling memory_stats() on one here made the two-process CPU
    # test (tests/test_distributed.py) time out at its first collective (bisected; cause unknown)
    memory = (device_memory(device, config.gpu_memory_utilization)
              if config.usage_context == "llm" and device.platform != "cpu" else None)
    big = (memory is not None
           and memory[0] >= _LARGE_DEVICE_BYTES * config.gpu_memory_utilization)
    seqs, tokens = (1024, 16384) if big else (256, 2048)
    return (config.max_num_seqs or seqs, config.max_num_batched_tokens or tokens)


def num_kv_pages_for(config: EngineConfig, model_config: ModelConfig, dtype, max_model_len: int,
                     devices) -> int:
    """Pages that fit in gpu_memory_utilization of each device after weights and activations."""
    if config.num_kv_pages is not None:
        return config.num_kv_pages
    tp = config.tensor_parallel_size
    per_page = kv_cache_bytes_per_page(model_config.num_layers, config.page_size,
                                       model_config.num_kv_heads, model_config.head_dim, dtype) // tp
    memory = device_memory(devices[0], config.gpu_memory_utilization)
    if memory is not None:
        # Room for one step's activations (the MLP's [T, F] intermediates) and the sampler's f32
        # [B, V] logits and temporaries (B <= max_num_seqs rows are sampled per step; the top-k /
        # top-p search keeps several [B, V] buffers live: 8 were seen on the H200, 16 reserved).
        tokens = config.max_num_batched_tokens
        rows = min(tokens, config.max_num_seqs)
        act = (tokens * model_config.intermediate_size * 8
               + rows * model_config.vocab_size * 4 * 16 // tp
               + _XLA_WORKSPACE_BYTES)
        # bytes_limit is gpu_memory_utilization of the device (reserve_device_memory), unless the
        # backend started earlier or XLA_PYTHON_CLIENT_MEM_FRACTION was set: then that share.
        limit, in_use = memory
        budget = limit - in_use - act
        logger.info("KV pool sizing: %.2f GiB of %.2f GiB left after the weights are kept for "
                    "one step's temporaries (estimate; warm-up logs XLA's measured peak)",
                    act / 2**30, (limit - in_use) / 2**30)
    elif devices[0].platform == "cpu":
        budget = _CPU_KV_BUDGET_BYTES * config.gpu_memory_utilization
    else:
        raise ValueError(f"the {devices[0].platform} device reports no memory limit (memory_stats: "
                         f"{sorted(devices[0].memory_stats() or {})}, no nvidia-smi), so the KV "
                         "pool cannot be sized from gpu_memory_utilization: set num_kv_pages "
                         "(--num-kv-pages)")
    return int(budget // per_page)


def kv_cache_dtype(kv_cache_dtype: str, param_dtype) -> jnp.dtype:
    """--kv-cache-dtype: "auto" = the param dtype; "fp8" / "fp8_e4m3" = e4m3 pages with scale 1.0
    (vLLM's default when the checkpoint carries no KV scales; write_kv saturates at +-448)."""
    if kv_cache_dtype == "auto":
        return jnp.dtype(param_dtype)
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return jnp.dtype(jnp.float8_e4m3fn)
    raise ValueError(f"{kv_cache_dtype=} is not supported; supported: auto, fp8, fp8_e4m3")


def attention_impl_for(attention_backend: str, kv_dtype) -> str:
    """default_impl, except that e4m3 pages are read by the reference only: the Pallas kernels
    copy bf16/f32 pages into their tiles (TODO(quant): e4m3 pages in kernel_gpu.py)."""
    impl = default_impl(attention_backend)
    if jnp.dtype(kv_dtype) != jnp.dtype(jnp.float8_e4m3fn) or impl == "reference":
        return impl
    if attention_backend == "pallas":
        raise ValueError("kv_cache_dtype fp8 needs attention_backend 'reference' or 'auto': the "
                         "Pallas attention kernels do not read e4m3 pages yet")
    logger.warning("kv_cache_dtype fp8: attention runs the reference implementation (the Pallas "
                   "kernels do not read e4m3 pages yet)")
    return "reference"


def log_weight_bytes(state, mc: ModelConfig) -> None:
    """Memory accounting: the weights' bytes per dtype (quantized projections show as e4m3 or
    int32-packed int4 plus their f16/f32 scales)."""
    by_dtype: dict[str, int] = {}
    for leaf in jax.tree.leaves(state):
        by_dtype[leaf.dtype.name] = by_dtype.get(leaf.dtype.name, 0) + leaf.nbytes
    parts = sorted(by_dtype.items(), key=lambda kv: -kv[1])
    logger.info("weights: %.3f GiB (%s), quantization=%s", sum(by_dtype.values()) / 2**30,
                ", ".join(f"{name} {n / 2**30:.3f} GiB" for name, n in parts), mc.quantization)


def check_pool_holds_max_model_len(num_pages: int, page_size: int, max_model_len: int) -> None:
    """vLLM refuses to start when one sequence of max_model_len tokens cannot fit the KV pool;
    otherwise such a request would be admitted and could never be scheduled."""
    needed = -(-max_model_len // page_size)
    if num_pages < needed:
        raise ValueError(
            f"max_model_len={max_model_len} needs {needed} KV pages but the pool holds "
            f"{num_pages} ({num_pages * page_size} tokens); lower max_model_len to at most "
            f"{num_pages * page_size}, or raise num_kv_pages / gpu_memory_utilization")


def reserve_device_memory(gpu_memory_utilization: float) -> None:
    """Let JAX's GPU allocator take gpu_memory_utilization of the device (vLLM's meaning), not its
    default 75%: without it the KV pool of an H200 was sized from 75% of 141 GB. Effective only
    before the backend starts; an XLA_PYTHON_CLIENT_MEM_FRACTION set by the user wins."""
    from jax._src import xla_bridge  # no public API tells whether the backend has started

    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if fraction is not None:
        if fraction != f"{gpu_memory_utilization:.4f}":
            logger.info("XLA_PYTHON_CLIENT_MEM_FRACTION=%s is set: it is the device share for "
                        "weights and KV cache, not gpu_memory_utilization=%s", fraction,
                        gpu_memory_utilization)
        return
    if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
        if jax.default_backend() != "cpu":
            logger.warning("the JAX backend started before the engine: its allocator keeps "
                           "JAX's own share of device memory (75%% by default), not "
                           "gpu_memory_utilization=%s", gpu_memory_utilization)
        return
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{gpu_memory_utilization:.4f}"


# generation_config.json key -> SamplingParams field (the fields vLLM's --generation-config reads)
_GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                      "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                      "max_new_tokens": "max_tokens"}


def sampling_defaults(config: EngineConfig, model_generation_config: dict) -> dict:
    """vLLM's --generation-config: "auto" takes the model's generation_config.json sampling fields
    as the defaults of requests that do not set them, "vllm" none, a directory its file's."""
    if config.generation_config == "vllm":
        return {}
    source = (model_generation_config if config.generation_config == "auto"
              else read_generation_config(config.generation_config))
    defaults = {field: source[key] for key, field in _GENERATION_FIELDS.items()
                if source.get(key) is not None}
    if defaults:
        logger.info("request defaults from generation_config.json: %s (--generation-config vllm "
                    "turns them off)", defaults)
    return defaults


def enable_compilation_cache() -> None:
    """Persist compiled steps across processes on accelerators (a restart skips most compiles).
    JAX_COMPILATION_CACHE_DIR, if set, wins; CPU runs (tests) keep no cache."""
    if jax.default_backend() == "cpu" or jax.config.jax_compilation_cache_dir:
        return
    path = os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # dummy fillers too
    logger.info("compilation cache: %s", path)


def build_engine_parts(config: EngineConfig) -> EngineParts:
    from jaxserve.weights import load_model

    if config.data_parallel_size != 1:  # the DP router gives each replica data_parallel_size=1
        raise ValueError(f"data_parallel_size={config.data_parallel_size} runs replicas behind "
                         "`jaxserve serve` only; one engine (LLM, --engine-in-process) needs 1")
    reserve_device_memory(config.gpu_memory_utilization)
    start = time.perf_counter()
    enable_compilation_cache()  # starts the backend

    tp = config.tensor_parallel_size
    mesh = make_mesh(tp)
    logger.info("backend %s up, mesh of %d device(s) in %.1fs", jax.default_backend(),
                mesh.devices.size, time.perf_counter() - start)
    seqs, tokens = batch_defaults(config, mesh.devices.flat[0])
    if (seqs, tokens) != (config.max_num_seqs, config.max_num_batched_tokens):
        logger.info("max_num_seqs=%d, max_num_batched_tokens=%d (the device's defaults where not "
                    "set)", seqs, tokens)
        config = dataclasses.replace(config, max_num_seqs=seqs, max_num_batched_tokens=tokens)
    rules = ShardingRules()
    loaded = load_model(config.model, load_format=config.load_format, dtype=config.dtype,
                        tensor_parallel_size=tp, mesh=mesh, rules=rules,
                        max_model_len=config.max_model_len, seed=config.seed,
                        hf_overrides=config.hf_overrides, tokenizer=config.tokenizer,
                        revision=config.revision, download_dir=config.download_dir,
                        quantization=config.quantization)
    mc, graphdef, state = loaded.config, loaded.graphdef, loaded.state
    if config.enable_lora:  # LoRA adapter slots (jaxserve/lora.py, models/lora.py)
        from jaxserve.lora import lora_model_config
        from models.lora import add_lora_slots

        mc = lora_model_config(mc, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank)
        graphdef, state = add_lora_slots(state, mc, loaded.dtype, mesh, rules,
                                         formats=loaded.formats)
    max_model_len = loaded.max_model_len
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, loaded.dtype)
    impl = attention_impl_for(config.attention_backend, kv_dtype)
    log_weight_bytes(loaded.state, mc)
    devices = mesh.devices.flatten().tolist()
    num_pages = num_kv_pages_for(config, mc, kv_dtype, max_model_len, devices)
    check_pool_holds_max_model_len(num_pages, config.page_size, max_model_len)
    if config.trust_remote_code:
        logger.warning("trust_remote_code is accepted for vLLM compatibility; jaxserve runs no "
                       "code from the model repository")
    kv_cache = init_kv_cache(mc.num_layers, num_pages, config.page_size, mc.num_kv_heads,
                             mc.head_dim, kv_dtype, kv_cache_sharding(mesh, rules))
    gib = num_pages * kv_cache_bytes_per_page(mc.num_layers, config.page_size, mc.num_kv_heads,
                                              mc.head_dim, kv_dtype) / 2**30
    logger.info("KV cache: %d pages of %d tokens (%d tokens, %.2f GiB, %s), attention=%s, "
                "max_model_len=%d: holds %d sequences of max_model_len at once (max_num_seqs=%d)",
                num_pages, config.page_size, num_pages * config.page_size, gib, kv_dtype.name, impl,
                max_model_len, num_pages // -(-max_model_len // config.page_size),
                config.max_num_seqs)
    runner = ModelRunner(graphdef, state, kv_cache, vocab_size=mc.vocab_size,
                         max_num_seqs=config.max_num_seqs,
                         max_num_batched_tokens=config.max_num_batched_tokens,
                         max_model_len=max_model_len, attention_impl=impl,
                         mesh=mesh, max_logprobs=config.max_logprobs)
    if not config.enforce_eager and jax.default_backend() != "cpu":
        runner.warmup()  # every token bucket compiled now, in parallel, not mid-run
    return EngineParts(model_config=mc, model_name=loaded.model_name, tokenizer=loaded.tokenizer,
                       chat_template=loaded.chat_template, eos_token_ids=loaded.eos_token_ids,
                       max_model_len=max_model_len, num_kv_pages=num_pages, runner=runner,
                       sampling_defaults=sampling_defaults(config, loaded.generation_config),
                       config=config)
