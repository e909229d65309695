"""Mixture-of-experts block shared by Mixtral, Qwen2-MoE and Qwen3-MoE: route each token to its
top-k experts, run the experts as grouped matmuls (kernels_pallas.grouped_matmul: Pallas on GPU,
ragged_dot elsewhere) over the tokens sorted by expert, and sum the results back per token with the
routing weights. DecoderLayer's `mlp`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.sharding import experts_parallel, num_shards
from kernels_pallas.grouped_matmul import grouped_matmul
from models.layers import CausalLM, DecoderLayer, GatedMLP, param


@dataclass(frozen=True, kw_only=True)
class MoEConfig(ModelConfig):
    """ModelConfig plus the expert fields; intermediate_size stays the dense MLP's F."""

    num_experts: int  # E
    num_experts_per_tok: int  # k
    moe_intermediate_size: int  # one expert's F
    norm_topk_prob: bool  # renormalize the k routing weights to sum to 1 (Mixtral: always)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0 = none
    mlp_only_layers: tuple[int, ...] = ()  # layers with a dense MLP instead (Qwen-MoE)
    decoder_sparse_step: int = 1  # MoE in layers i with (i + 1) % step == 0 (Qwen-MoE)

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"{self.num_experts_per_tok=} must be in [1, {self.num_experts=}]")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"{self.decoder_sparse_step=} must be >= 1")

    def is_sparse(self, layer_idx: int) -> bool:
        """HF Qwen2MoeDecoderLayer's rule for which layers hold experts."""
        return (layer_idx not in self.mlp_only_layers
                and (layer_idx + 1) % self.decoder_sparse_step == 0)


# llama.cpp's GGUFs store each layer's experts as one [E, out, in] tensor (ffn_{gate,up,down}_exps,
# named so by jaxserve/gguf_checkpoint.py) rather than one HF tensor per expert.
STACKED_EXPERTS_WEIGHT_MAP = {
    r"model\.layers\.(\d+)\.mlp\.experts\.(gate|up|down)_proj\.weight":
        ("layers.{0}.mlp.{1}_proj", lambda w, cfg: w.transpose(0, 2, 1)),
}


def moe_config(base: ModelConfig, **moe_fields) -> MoEConfig:
    """A MoEConfig with base's fields (from models.hf.base_config_from_hf) and the expert fields."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return MoEConfig(**fields, **moe_fields)


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights f32[T, k], expert ids i32[T, k]), HF's TopKRouter:
    softmax in f32, top-k, optionally renormalized. Exact ties go to the lower expert id (vLLM's
    topk_softmax does the same; torch.topk leaves ties unspecified)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, expert_ids = jax.lax.top_k(probs, top_k)  # lax.top_k: equal values keep index order
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, expert_ids.astype(jnp.int32)


def grouped_experts(x: jax.Array, weights: jax.Array, expert_ids: jax.Array, w_gate: jax.Array,
                    w_up: jax.Array, w_down: jax.Array, first_expert: jax.Array, *,
                    impl: str = "auto") -> jax.Array:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over the experts held here, grouped matmuls.

    x [T, D], weights f32[T, k], expert_ids i32[T, k], w_gate/w_up [E', D, F], w_down [E', F, D]
    holding experts first_expert .. first_expert + E' - 1 (all E with E' = E on one device).
    Assignments to other experts sort last, outside every group, and get weight 0. impl: the
    grouped_matmul implementation ("auto": the Pallas kernel on GPU, ragged_dot elsewhere).
    -> [T, D] in x.dtype (the weighted sum in f32).
    """
    T, k = expert_ids.shape
    num_local = w_gate.shape[0]
    local = expert_ids.reshape(-1) - first_expert  # [T*k]
    held = (local >= 0) & (local < num_local)
    local = jnp.where(held, local, num_local)
    order = jnp.argsort(local, stable=True)  # [T*k], rows grouped by expert
    group_sizes = jnp.bincount(local, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [T*k, D]; row r came from token order[r] // k
    gate = grouped_matmul(xs, w_gate, group_sizes, impl=impl)  # [T*k, F]
    up = grouped_matmul(xs, w_up, group_sizes, impl=impl)
    out = grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes, impl=impl)  # [T*k, D]
    # Rows past the last group are zeros (ragged_dot's contract, which grouped_matmul keeps), but
    # select anyway, never multiply by a zero weight (0 * NaN).
    out = jnp.where(held[order][:, None], out, 0)
    unsorted = jnp.zeros_like(out).at[order].set(out).reshape(T, k, -1)  # back to (token, slot)
    w = jnp.where(held.reshape(T, k), weights, 0.0)
    y = jnp.einsum("TKD,TK->TD", unsorted.astype(jnp.float32), w)
    return y.astype(x.dtype)


def experts_reference(x, weights, expert_ids, w_gate, w_up, w_down) -> jax.Array:
    """grouped_experts' oracle: every expert on every token, masked by the routing. Slow."""
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(w_gate.shape[0]):
        h = jax.nn.silu(x @ w_gate[e]) * (x @ w_up[e])
        coef = jnp.sum(jnp.where(expert_ids == e, weights, 0.0), axis=-1)  # [T]
        y = y + coef[:, None] * (h @ w_down[e]).astype(jnp.float32)
    return y.astype(x.dtype)


class SparseMoE(nnx.Module):
    """Top-k routed experts (+ Qwen2-MoE's shared expert, gated by sigmoid(x @ its gate))."""

    def __init__(self, cfg: MoEConfig, *, dtype, rngs: nnx.Rngs):
        D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        if E % num_shards("expert"):
            raise ValueError(f"num_experts={E} must be divisible by the {num_shards('expert')} "
                             f"expert-parallel shards (tensor_parallel_size)")
        self.cfg = cfg
        self.router = param(rngs, (D, E), ("embed", None), dtype)
        self.gate_proj = param(rngs, (E, D, F), ("expert", "embed", "expert_ffw"), dtype)
        self.up_proj = param(rngs, (E, D, F), ("expert", "embed", "expert_ffw"), dtype)
        self.down_proj = param(rngs, (E, F, D), ("expert", "expert_ffw", "embed"), dtype)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg, dtype=dtype, rngs=rngs,
                                          intermediate_size=cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = param(rngs, (D,), ("embed",), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D] -> [T, D]
        cfg = self.cfg
        # Logits in the model dtype, then f32 in route(): HF rounds them the same way.
        logits = jnp.einsum("TD,DE->TE", x, self.router[...])
        weights, expert_ids = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        y = experts_parallel(grouped_experts)(x, weights, expert_ids, self.gate_proj[...],
                                              self.up_proj[...], self.down_proj[...])
        if cfg.shared_expert_intermediate_size:
            gate = jax.nn.sigmoid(jnp.einsum("TD,D->T", x, self.shared_expert_gate[...]))
            y = y + gate[:, None] * self.shared_expert(x)
        return y


class MoECausalLM(CausalLM):
    """CausalLM whose sparse layers (cfg.is_sparse) take a SparseMoE as their MLP."""

    def make_layer(self, cfg: MoEConfig, layer_idx: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        mlp = SparseMoE(cfg, dtype=dtype, rngs=rngs) if cfg.is_sparse(layer_idx) else None
        return DecoderLayer(cfg, dtype=dtype, rngs=rngs, mlp=mlp)
