"""Frozen configs: the model's shape (ModelConfig) and the engine's knobs (EngineConfig).

Both are hashable so they can be static jit arguments. Validation lives in __post_init__.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("auto", "reference", "pallas")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = (None, "fp8", "awq", "gptq", "gguf")  # models/quant.py METHODS
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # fp8 = e4m3 pages, scale 1.0 (vLLM's default)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of a Llama-family decoder; built from a HF config.json by models/<arch>.config_from_hf."""

    architecture: str  # HF `architectures[0]`, the registry key
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_q_heads: int  # N
    num_kv_heads: int  # K (after replication for tensor parallelism, see with_kv_replication)
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # HF rope_scaling as a sorted tuple of (key, value) pairs so the config stays hashable.
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3
    sliding_window: int | None = None  # Mistral; None = full attention
    attn_logits_soft_cap: float | None = None
    kv_replication: int = 1  # each HF kv head is stored this many times (tensor parallel > K)
    # Projection weight format (models/linear.py, models/quant.py): None (the param dtype),
    # "fp8" (e4m3 W8A8), "int4" (AWQ/GPTQ packed, quant_group_size input rows per scale) or
    # "gguf" (per projection: int4_f32 or int8_g32, models/linear.py set_projection_formats).
    quantization: str | None = None
    quant_group_size: int = 128
    # LoRA adapter slots on device (models/lora.py): S and the padded rank R; 0 = no LoRA params.
    max_loras: int = 0
    max_lora_rank: int = 0

    def __post_init__(self):
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_q_heads=} must be divisible by {self.num_kv_heads=}")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def with_kv_replication(self, tensor_parallel_size: int) -> "ModelConfig":
        """Repeat KV heads so that every tensor-parallel shard holds at least one."""
        if tensor_parallel_size <= self.num_kv_heads:
            if self.num_kv_heads % tensor_parallel_size:
                raise ValueError(
                    f"{tensor_parallel_size=} must divide num_kv_heads={self.num_kv_heads}")
            return self
        if tensor_parallel_size % self.num_kv_heads:
            raise ValueError(
                f"{tensor_parallel_size=} must be a multiple of num_kv_heads={self.num_kv_heads}")
        rep = tensor_parallel_size // self.num_kv_heads
        return dataclasses.replace(self, num_kv_heads=self.num_kv_heads * rep,
                                   kv_replication=self.kv_replication * rep)


def hashable_rope_scaling(rope_scaling: dict | None) -> tuple | None:
    """HF rope_scaling dict -> sorted tuple of pairs (lists become tuples)."""
    if not rope_scaling:
        return None
    items = []
    for k, v in sorted(rope_scaling.items()):
        items.append((k, tuple(v) if isinstance(v, list) else v))
    return tuple(items)


def _opt(default, help: str, **cli):
    """An EngineConfig field with what its `jaxserve serve` flag needs (help text, choices, aliases);
    jaxserve/cli.py derives every engine flag from these, so no flag list is kept twice."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything LLM(...) accepts and `jaxserve serve` derives its engine flags from; names and
    defaults follow vLLM's EngineArgs. Options vLLM has and jaxserve does not implement are fields
    too, accepted at their off value and refused (ValueError naming them) otherwise."""

    model: str | None = _opt(None, "HF directory, hub repo id, .gguf file, or (load_format=dummy) "
                                   "a preset; None = the embedded SmolLM2-135M-Instruct", cli=False)
    tokenizer: str | None = _opt(None, "tokenizer directory or .gguf file (default: the model's)")
    revision: str | None = _opt(None, "hub revision (branch, tag or commit) of the model")
    download_dir: str | None = _opt(None, "directory for hub downloads (default: the HF cache)")
    trust_remote_code: bool = _opt(False, "accepted for vLLM compatibility; no remote code runs")
    dtype: str = _opt("auto", "weight and activation dtype", choices=DTYPES)
    max_model_len: int | None = _opt(None, "context length (default: the model's)")
    tensor_parallel_size: int = _opt(1, "devices to shard the model over", aliases=("-tp",))
    gpu_memory_utilization: float = _opt(0.9, "fraction of device memory for weights and KV cache")
    max_num_seqs: int | None = _opt(None, "sequences per step (default: by device, as vLLM: "
                                    "1024 offline on GPUs with >= 70 GiB, else 256)")
    max_num_batched_tokens: int | None = _opt(None, "tokens per step, chunked prefill (default: by "
                                              "device: 16384 offline on GPUs with >= 70 GiB, "
                                              "else 2048)")
    page_size: int = _opt(16, "tokens per KV page", aliases=("--block-size",))
    # Who runs the engine: the batch defaults differ (offline throughput vs serving latency).
    usage_context: str = _opt("llm", "llm (offline LLM) or server (jaxserve serve)", cli=False)
    num_kv_pages: int | None = _opt(None, "KV pages (default: what fits in memory)")
    seed: int = _opt(0, "engine seed (requests without a seed draw from it)")
    load_format: str = _opt("auto", "weight source; dummy = random weights", choices=LOAD_FORMATS)
    attention_backend: str = _opt("auto", "attention op", choices=ATTENTION_BACKENDS)
    enable_prefix_caching: bool = _opt(True, "reuse the KV pages of shared prompt prefixes")
    enforce_eager: bool = _opt(False, "compile each step shape lazily instead of at start-up")
    max_logprobs: int = _opt(20, "largest logprobs / prompt_logprobs a request may ask for")
    generation_config: str = _opt(
        "auto", "'auto': the model's generation_config.json sampling fields are the request "
                "defaults; 'vllm': jaxserve's own defaults; or a directory holding the file")
    hf_overrides: tuple[tuple[str, object], ...] | None = _opt(
        None, "JSON object merged over the model's config.json", json=True)
    # vLLM options jaxserve does not implement: accepted only at their off value.
    pipeline_parallel_size: int = _opt(1, "must be 1: jaxserve has tensor parallelism only",
                                       aliases=("-pp",))
    data_parallel_size: int = _opt(1, "engine replicas behind one `jaxserve serve` (each on its own "
                                      "tensor_parallel_size devices); LLM runs one engine",
                                   aliases=("-dp",))
    quantization: str | None = _opt(
        None, "fp8 (W8A8: an FP8 checkpoint, or a float one quantized at load), awq or gptq "
              "(int4 checkpoints), gguf (a .gguf file's Q4 projections kept int4, Q8_0 int8); "
              "unset: the checkpoint's quantization_config, if any",
        aliases=("-q",))
    kv_cache_dtype: str = _opt("auto", "auto (the model's dtype) or fp8 / fp8_e4m3 (e4m3 pages)")
    cpu_offload_gb: float = _opt(0.0, "must be 0: weights are not offloaded to the CPU")
    enable_lora: bool = _opt(False, "serve LoRA adapters (LoRARequest, --lora-modules)")
    max_loras: int = _opt(1, "LoRA adapters one step can mix (device slots)")
    max_lora_rank: int = _opt(16, "largest LoRA rank; smaller ranks are zero-padded to it")
    max_cpu_loras: int | None = _opt(None, "LoRA adapters kept in host memory (default: max_loras)")
    speculative_config: str | None = _opt(None, "must be unset: no speculative decoding",
                                          json=True)

    def __post_init__(self):
        if isinstance(self.hf_overrides, dict):  # LLM(hf_overrides={...}): keep it hashable
            object.__setattr__(self, "hf_overrides", hashable_rope_scaling(self.hf_overrides))
        self._validate_choices()
        self._validate_ranges()
        self._refuse_unimplemented()

    def _validate_choices(self):
        for name in ("dtype", "attention_backend", "load_format"):
            choices = EngineConfig.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        for name, choices in (("quantization", QUANTIZATIONS),
                              ("kv_cache_dtype", KV_CACHE_DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; supported: "
                                 f"{choices}")
        if self.generation_config not in ("auto", "vllm") and not os.path.isdir(
                self.generation_config):
            raise ValueError(f"{self.generation_config=} must be 'auto', 'vllm' or a directory")

    def _validate_ranges(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"{self.tensor_parallel_size=} must be >= 1")
        if self.data_parallel_size < 1:
            raise ValueError(f"{self.data_parallel_size=} must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"{self.gpu_memory_utilization=} must be in (0, 1]")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"{self.page_size=} must be a positive power of two")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"{self.max_num_seqs=} must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"{self.max_num_batched_tokens=} must be >= 1")
        if self.usage_context not in ("llm", "server"):
            raise ValueError(f"{self.usage_context=} must be 'llm' or 'server'")
        if self.num_kv_pages is not None and self.num_kv_pages < 2:
            raise ValueError(f"{self.num_kv_pages=} must be >= 2")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"{self.max_model_len=} must be >= 1")
        if self.max_logprobs < 0:
            raise ValueError(f"{self.max_logprobs=} must be >= 0")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"{self.max_loras=} and {self.max_lora_rank=} must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"{self.max_cpu_loras=} must be >= {self.max_loras=}")

    def _refuse_unimplemented(self):
        for name, off in (("pipeline_parallel_size", 1), ("cpu_offload_gb", 0.0),
                          ("speculative_config", None)):
            value = getattr(self, name)
            if value != off:
                why = EngineConfig.__dataclass_fields__[name].metadata["help"].split(": ", 1)[-1]
                raise ValueError(f"{name}={value!r} is not supported: {why}")

