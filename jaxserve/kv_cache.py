"""Device-side KV cache and attention metadata: pure pytrees, returned and never mutated.

The runner builds AttentionMetadata from a host Batch; every layer reads it and writes its new K/V with
write_kv. The jitted step donates the KVCache so XLA updates the pages in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass
class KVCache:
    """Per layer pages; k[l] and v[l] are [P, S, K, H] (num_pages, page_size, kv heads, head_dim)."""

    k: list[jax.Array]
    v: list[jax.Array]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_slots(self) -> int:
        """Flat slot count; also the padding slot value (out of range, dropped by write_kv)."""
        return self.num_pages * self.page_size


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v"], meta_fields=[])


@dataclass
class AttentionMetadata:
    """What every attention layer needs for one step. Built by runner.py from a host Batch.

    T = padded token count, B = padded sequence count, M = padded max pages per sequence.
    Sequence b owns query tokens cu_q_lens[b]:cu_q_lens[b+1]; its context (cached + new) is kv_lens[b]
    tokens long, read through page_table[b]. Padding sequences (b >= num_seqs) have zero query and KV
    length. Padding tokens have slot num_slots (dropped) and position 0.
    """

    positions: jax.Array  # i32[T] absolute position of each token (rope)
    slot_mapping: jax.Array  # i32[T] page*page_size+offset where token's K/V go; pad = num_slots
    page_table: jax.Array  # i32[B, M] page ids of each sequence; unused entries 0
    kv_lens: jax.Array  # i32[B] context length after this step's tokens; 0 for padding seqs
    cu_q_lens: jax.Array  # i32[B+1] cumulative query lengths; constant after num_seqs
    num_seqs: jax.Array  # i32[1] number of live sequences
    # i32[T] LoRA slot of each token (models/lora.py); outside [0, max_loras) = the base model.
    lora_slots: jax.Array | None = None
    # Static: which attention implementation the layers call (see kernels_pallas.ragged_paged_attention).
    attention_impl: str = "reference"


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=["positions", "slot_mapping", "page_table", "kv_lens", "cu_q_lens", "num_seqs",
                 "lora_slots"],
    meta_fields=["attention_impl"],
)


def write_kv(pages: jax.Array, new: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """pages [P, S, K, H] <- new [T, K, H] at flat slots i32[T]; out-of-range slots are dropped.

    Never pad with -1: `.at[-1]` wraps to the last slot instead of dropping.
    """
    flat = pages.reshape(-1, *pages.shape[2:])
    if pages.dtype == jnp.float8_e4m3fn:  # --kv-cache-dtype fp8, scale 1.0: saturate, never NaN
        new = jnp.clip(new.astype(jnp.float32), -448.0, 448.0)
    flat = flat.at[slot_mapping].set(new.astype(pages.dtype), mode="drop")
    return flat.reshape(pages.shape)


def init_kv_cache(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                  head_dim: int, dtype, sharding=None) -> KVCache:
    """Zeroed cache; with a sharding, each page array is created directly on its shards."""
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    # One jitted filler for all 2L arrays: a fresh lambda per array compiled 2L times.
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return KVCache(k=[make() for _ in range(num_layers)], v=[make() for _ in range(num_layers)])


def kv_cache_bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
                            dtype) -> int:
    return 2 * num_layers * page_size * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize
