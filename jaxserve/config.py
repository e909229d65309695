"""Frozen configs: the model's shape (ModelConfig) and the engine's knobs (EngineConfig).

Both are hashable so they can be static jit arguments. Validation lives in __post_init__.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ATTENTION_BACKENDS = ("auto", "reference", "pallas")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "bfloat16", "float16")


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


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything LLM(...) accepts; names follow vLLM's EngineArgs."""

    model: str | None = None  # HF directory, .gguf file, preset name; None = embedded SmolLM2
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    page_size: int = 16
    num_kv_pages: int | None = None
    seed: int = 0
    load_format: str = "auto"
    attention_backend: str = "auto"
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    max_logprobs: int = 20
    hf_overrides: tuple[tuple[str, object], ...] | None = field(default=None)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.dtype=} must be one of {DTYPES}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{self.attention_backend=} must be one of {ATTENTION_BACKENDS}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"{self.load_format=} must be one of {LOAD_FORMATS}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"{self.tensor_parallel_size=} must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"{self.gpu_memory_utilization=} must be in (0, 1]")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"{self.page_size=} must be a positive power of two")
        if self.max_num_seqs < 1:
            raise ValueError(f"{self.max_num_seqs=} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"{self.max_num_batched_tokens=} must be >= 1")
        if self.num_kv_pages is not None and self.num_kv_pages < 2:
            raise ValueError(f"{self.num_kv_pages=} must be >= 2")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"{self.max_model_len=} must be >= 1")
