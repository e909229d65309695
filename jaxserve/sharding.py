"""Mesh and logical-axis sharding rules: the ONLY module that names mesh axes.

Logical axis names used by models/ and kv_cache (documented here):
  batch     sequences in a step                 tokens   flattened ragged tokens (T)
  embed     model width D                       q_heads  query heads N
  kv_heads  key/value heads K                   head_dim per-head width H
  ffw       MLP hidden width F                  vocab    vocabulary V
  pages     KV pages P                          page_slot slots in a page S
  layers    decoder layers L                    norm     norm scales (replicated)
  expert    MoE experts E (expert parallel)     expert_ffw a MoE expert's hidden width F
  lora_slot LoRA adapter slots S (replicated)   lora_rank  a LoRA's rank R (replicated)
  (a LoRA's A and B otherwise carry its base weight's names, so they split as the weight does)
Mesh axes: "data" (replicas, unused by the engine so far) and "model" (tensor parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclass(frozen=True, kw_only=True)
class ShardingRules:
    """Logical axis -> mesh axis (None = replicated). Tensor parallelism splits heads and ffw."""

    batch: str | None = None
    tokens: str | None = None
    embed: str | None = None
    q_heads: str | None = "model"
    kv_heads: str | None = "model"
    head_dim: str | None = None
    ffw: str | None = "model"
    vocab: str | None = "model"
    pages: str | None = None
    page_slot: str | None = None
    layers: str | None = None
    norm: str | None = None
    # Expert parallelism: each model shard holds E / tp whole experts (experts_parallel below).
    # Tensor-parallel experts instead would be expert=None, expert_ffw="model".
    expert: str | None = "model"
    expert_ffw: str | None = None
    lora_slot: str | None = None
    lora_rank: str | None = None

    def as_pairs(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((k, getattr(self, k)) for k in self.__dataclass_fields__)


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tensor_parallel_size > len(devices):
        raise ValueError(f"{tensor_parallel_size=} exceeds the {len(devices)} available devices")
    grid = np.array(devices[:tensor_parallel_size]).reshape(1, tensor_parallel_size)
    return Mesh(grid, ("data", "model"))


def logical_to_spec(names: tuple[str | None, ...], rules: ShardingRules) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; two dims on one mesh axis is an error."""
    axes, used = [], set()
    for name in names:
        axis = None if name is None else getattr(rules, name)
        if axis is not None and axis in used:
            raise ValueError(f"mesh axis {axis!r} used twice in {names=}")
        if axis is not None:
            used.add(axis)
        axes.append(axis)
    return PartitionSpec(*axes)


def named_sharding(mesh: Mesh, names: tuple[str | None, ...], rules: ShardingRules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, rules))


def kv_cache_sharding(mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    """Pages [P, S, K, H] split by kv heads."""
    return named_sharding(mesh, ("pages", "page_slot", "kv_heads", "head_dim"), rules)


def shard(x: jax.Array, *names: str | None) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, ShardingRules()))


def rows_parallel(fn):
    """Run fn(*args) once per model shard on B / tp whole rows of every argument (each leaf's
    leading axis is the batch B), outputs concatenated by rows. For the sampler: over vocab-split
    logits each of its vocabulary reductions was a collective, most inside its lax.conds (181 of
    190 in the full variant at TP=2, 2 in the greedy one); a conditional that XLA:GPU does not
    capture into a command buffer runs by reading its predicate on the host, so the launch waits
    for the device (issue 13 measured such conds; whether collectives keep it out is to be
    measured: benchmarks/tp_collectives.py --time). Here the rows move once (one all-to-all of
    the logits) and the sampler runs collective-free. Identity outside a mesh, with one model
    shard, or when B does not divide (then fn runs on the whole batch)."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh is None or mesh.empty else dict(mesh.shape).get("model", 1)
    if shards == 1:
        return fn

    def per_rows(*args):
        if jax.tree.leaves(args)[0].shape[0] % shards:
            return fn(*args)
        rows = PartitionSpec("model")  # a prefix spec: the leading axis of every leaf
        return jax.shard_map(fn, in_specs=tuple(rows for _ in args), out_specs=rows,
                             check_vma=False)(*args)

    return per_rows


def replicated(x: jax.Array) -> jax.Array:
    """Constrain to a full copy on every device (the sampler's outputs: the next step's inputs
    must keep the sharding the step was compiled with). No-op outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec())


def heads_parallel(attention_fn):
    """Run a per-layer attention op once per tensor-parallel shard (Pallas kernels are not
    partitioned by XLA): q [T, N, H] split on N, pages [P, S, K, H] split on K, metadata replicated.
    Identity outside a mesh or with one model shard."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or dict(mesh.shape).get("model", 1) == 1:
        return attention_fn
    rules = ShardingRules()
    q_spec = logical_to_spec(("tokens", "q_heads", "head_dim"), rules)
    kv_spec = logical_to_spec(("pages", "page_slot", "kv_heads", "head_dim"), rules)
    rep = PartitionSpec()
    return jax.shard_map(attention_fn, in_specs=(q_spec, kv_spec, kv_spec, rep, rep, rep, rep),
                         out_specs=q_spec, check_vma=False)


def num_shards(logical: str) -> int:
    """How many ways the current mesh splits a logical axis under the default rules (1 outside a
    mesh): what a dimension with that name must be divisible by."""
    mesh = jax.sharding.get_abstract_mesh()
    axis = getattr(ShardingRules(), logical)
    if mesh is None or mesh.empty or axis is None:
        return 1
    return dict(mesh.shape).get(axis, 1)


def experts_parallel(expert_fn):
    """Run a MoE expert op once per model shard on the experts it holds, and sum the shards.

    expert_fn(x [T, D], weights f32[T, k], expert_ids i32[T, k], w_gate [E', D, F'],
    w_up [E', D, F'], w_down [E', F', D], first_expert i32[]) -> partial y [T, D] over its E'
    experts, numbered from first_expert. Tokens and routing are replicated; expert weights split by
    the rules' `expert` (and `expert_ffw`) axes. Outside a mesh or with one model shard: one call
    over all experts with first_expert=0.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = ShardingRules()
    axes = tuple(dict.fromkeys(a for a in (rules.expert, rules.expert_ffw) if a is not None))
    if mesh is None or mesh.empty or all(dict(mesh.shape).get(a, 1) == 1 for a in axes):
        return lambda *args: expert_fn(*args, jnp.int32(0))
    up_spec = logical_to_spec(("expert", "embed", "expert_ffw"), rules)
    down_spec = logical_to_spec(("expert", "expert_ffw", "embed"), rules)
    rep = PartitionSpec()

    def per_shard(x, weights, expert_ids, w_gate, w_up, w_down):
        first = (jax.lax.axis_index(rules.expert) * w_gate.shape[0] if rules.expert
                 else jnp.int32(0))
        return jax.lax.psum(expert_fn(x, weights, expert_ids, w_gate, w_up, w_down, first), axes)

    return jax.shard_map(per_shard, in_specs=(rep, rep, rep, up_spec, up_spec, down_spec),
                         out_specs=rep, check_vma=False)
