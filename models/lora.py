"""LoRA adapters on device: S adapters stacked in slots, a per-token low-rank delta (Punica's BGMV /
SGMV design: one batch mixes adapters and the base model), and the slot writes.

Decoder blocks own one `LoRA` per projection when `cfg.max_loras > 0` and add
`lora(x, md.lora_slots)` right after the base projection. The engine writes an adapter's A/B
(host arrays from jaxserve/lora.py, PEFT's scale already folded into B) with write_lora_slot.
A token whose slot is outside [0, S) (the host pads and marks base-model tokens with
jaxserve.lora.NO_LORA_SLOT) gets a zero delta.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from models.linear import set_projection_formats

LORA_IMPLS = ("auto", "dense", "ragged", "reference")
# "auto" picks "dense" while every token's pass over all S*R stacked columns stays cheap next to
# the base matmul (rank 16 x 8 slots = 128 columns vs D = 4096: ~3% per projection), else ragged.
_DENSE_MAX_COLUMNS = 512


def _valid(token_slot: jax.Array, num_slots: int) -> jax.Array:
    return (token_slot >= 0) & (token_slot < num_slots)


def lora_delta_reference(x: jax.Array, a: jax.Array, b: jax.Array,
                         token_slot: jax.Array) -> jax.Array:
    """The oracle: gather each token's own A and B. x [T, I], a [S, I, R], b [S, R, O],
    token_slot i32[T] -> [T, O] in x's dtype; zero where the slot is outside [0, S)."""
    valid = _valid(token_slot, a.shape[0])
    idx = jnp.where(valid, token_slot, 0)
    h = jnp.einsum("TI,TIR->TR", x, a[idx], preferred_element_type=jnp.float32).astype(x.dtype)
    y = jnp.einsum("TR,TRO->TO", h, b[idx], preferred_element_type=jnp.float32)
    return jnp.where(valid[:, None], y, 0).astype(x.dtype)


def lora_delta_dense(x: jax.Array, a: jax.Array, b: jax.Array, token_slot: jax.Array) -> jax.Array:
    """Every token times every slot's A (one [T, I] x [I, S*R] matmul), the other slots' columns
    zeroed, times all B stacked ([T, S*R] x [S*R, O]). Plain dots: XLA shards them like the base
    weight's einsum. Same signature as lora_delta_reference."""
    S = a.shape[0]
    h = jnp.einsum("TI,SIR->TSR", x, a, preferred_element_type=jnp.float32).astype(x.dtype)
    mine = token_slot[:, None] == jnp.arange(S, dtype=token_slot.dtype)[None, :]  # bool[T, S]
    h = jnp.where(mine[:, :, None], h, 0)
    return jnp.einsum("TSR,SRO->TO", h, b, preferred_element_type=jnp.float32).astype(x.dtype)


def lora_delta_ragged(x: jax.Array, a: jax.Array, b: jax.Array, token_slot: jax.Array) -> jax.Array:
    """SGMV: sort tokens by slot, `jax.lax.ragged_dot` over the slot groups, unsort. Base-model
    tokens sort last, past every group (ragged_dot leaves them 0; masked again to be sure).
    Same signature as lora_delta_reference."""
    S = a.shape[0]
    valid = _valid(token_slot, S)
    key = jnp.where(valid, token_slot, S)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=S + 1)[:S].astype(jnp.int32)
    h = jax.lax.ragged_dot(x[order], a, group_sizes,
                           preferred_element_type=jnp.float32).astype(x.dtype)
    y_sorted = jax.lax.ragged_dot(h, b, group_sizes, preferred_element_type=jnp.float32)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    return jnp.where(valid[:, None], y, 0).astype(x.dtype)


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, token_slot: jax.Array,
               impl: str = "auto") -> jax.Array:
    """Per-token LoRA delta y[t] = (x[t] @ a[s]) @ b[s] with s = token_slot[t]; zero for tokens
    whose slot is outside [0, S). x [T, I], a [S, I, R], b [S, R, O] -> [T, O] (x's dtype; f32
    accumulation, the rank-R intermediate in x's dtype as PEFT computes it).

    impl: "dense" | "ragged" | "reference" | "auto" (dense up to 512 stacked columns S*R).
    """
    if impl not in LORA_IMPLS:
        raise ValueError(f"{impl=} must be one of {LORA_IMPLS}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1] or a.shape[1] != x.shape[1]:
        raise ValueError(f"LoRA shapes disagree: x {x.shape}, a {a.shape}, b {b.shape}")
    if impl == "auto":
        impl = "dense" if a.shape[0] * a.shape[2] <= _DENSE_MAX_COLUMNS else "ragged"
    fn = {"dense": lora_delta_dense, "ragged": lora_delta_ragged,
          "reference": lora_delta_reference}[impl]
    return fn(x, a, b, token_slot)


def _zeros(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], dtype) -> nnx.Param:
    init = nnx.with_partitioning(nnx.initializers.zeros, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, dtype))


class LoRA(nnx.Module):
    """The stacked adapters of one projection: a [S, *in, R], b [S, R, *out] (zeros = no adapter).

    `in_names` / `out_names` are the base weight's logical axes, so under tensor parallelism A
    and B split exactly as the weight does (jaxserve/sharding.py: lora_slot, lora_rank).
    """

    def __init__(self, cfg: ModelConfig, in_shape: tuple[int, ...], in_names: tuple[str, ...],
                 out_shape: tuple[int, ...], out_names: tuple[str, ...], *, dtype,
                 rngs: nnx.Rngs):
        S, R = cfg.max_loras, cfg.max_lora_rank
        self.a = _zeros(rngs, (S, *in_shape, R), ("lora_slot", *in_names, "lora_rank"), dtype)
        self.b = _zeros(rngs, (S, R, *out_shape), ("lora_slot", "lora_rank", *out_names), dtype)

    def __call__(self, x: jax.Array, token_slot: jax.Array | None) -> jax.Array:
        """x [T, *in], token_slot i32[T] -> delta [T, *out]."""
        assert token_slot is not None, "a model with LoRA slots needs md.lora_slots"
        a, b = self.a[...], self.b[...]
        S, R = a.shape[0], a.shape[-1]
        T = x.shape[0]
        y = lora_delta(x.reshape(T, -1), a.reshape(S, -1, R), b.reshape(S, R, -1), token_slot)
        return y.reshape(T, *b.shape[2:])


def attention_loras(cfg: ModelConfig, *, dtype, rngs: nnx.Rngs) -> tuple[LoRA, ...]:
    """(q, k, v, o) LoRAs in the einsum layouts of Attention's weights."""
    D, N, K, H = cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
    make = functools.partial(LoRA, cfg, dtype=dtype, rngs=rngs)
    return (make((D,), ("embed",), (N, H), ("q_heads", "head_dim")),
            make((D,), ("embed",), (K, H), ("kv_heads", "head_dim")),
            make((D,), ("embed",), (K, H), ("kv_heads", "head_dim")),
            make((N, H), ("q_heads", "head_dim"), (D,), ("embed",)))


def mlp_loras(cfg: ModelConfig, intermediate_size: int, *, dtype,
              rngs: nnx.Rngs) -> tuple[LoRA, ...]:
    """(gate, up, down) LoRAs in GatedMLP's layouts."""
    D, F = cfg.hidden_size, intermediate_size
    make = functools.partial(LoRA, cfg, dtype=dtype, rngs=rngs)
    return (make((D,), ("embed",), (F,), ("ffw",)), make((D,), ("embed",), (F,), ("ffw",)),
            make((F,), ("ffw",), (D,), ("embed",)))


def add_lora_slots(state: nnx.State, cfg: ModelConfig, dtype, mesh, rules,
                   formats: dict[str, str] | None = None):
    """Rebuild the model of `cfg` (max_loras > 0) with LoRA slots: -> (graphdef, state) holding
    `state`'s base params as they are and every LoRA A/B zeroed on its own sharding. formats: a
    GGUF base's per-projection formats (weights.LoadedModel.formats), rebuilt the same way."""
    from models import get_model_class

    cls = get_model_class(cfg.architecture)

    def build():
        model = cls(cfg, dtype=dtype, rngs=nnx.Rngs(0))
        if formats is not None:
            set_projection_formats(model, formats, dtype, nnx.Rngs(0))
        return model

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules.as_pairs()):
        model = nnx.eval_shape(build)
        graphdef, abstract = nnx.split(model)
        shardings = dict(nnx.to_flat_state(nnx.get_named_sharding(abstract, mesh)))
    base = dict(nnx.to_flat_state(state))
    for path, var in nnx.to_flat_state(abstract):
        if path in base:
            var.set_value(base[path].get_value())
            continue
        assert "lora" in ".".join(map(str, path)), f"base param {path} missing"
        value, sharding = var.get_value(), shardings[path].get_value()
        var.set_value(_zeros_maker(value.shape, value.dtype, sharding)())
    write_lora_slot(abstract, 0, {})  # compiles the slot write now, not at the first adapter
    return graphdef, abstract


@functools.lru_cache(maxsize=None)
def _zeros_maker(shape: tuple[int, ...], dtype, sharding):
    """One compiled filler per distinct (shape, dtype, sharding): 7 projections x 2 per model,
    not one compile per layer's A and B."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def lora_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    """{"layers.0.attn.q_lora.a": Variable [S, *in, R], ...}: the LoRA params of a model state."""
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)
            if len(path) >= 2 and str(path[-2]).endswith("_lora")}


@functools.partial(jax.jit, donate_argnums=0)
def _set_slot(stacks: list[jax.Array], slot: jax.Array, values: list[jax.Array]) -> list[jax.Array]:
    return [s.at[slot].set(v.astype(s.dtype)) for s, v in zip(stacks, values)]


def write_lora_slot(state: nnx.State, slot: int, weights: dict[str, tuple]) -> None:
    """Load one adapter into device slot `slot` of `state`, in place (its Variables get the new
    arrays; a step already dispatched keeps reading the old ones). weights: LoRA module path
    ("layers.0.attn.q_lora") -> host (a [*in, R], b [R, *out]); modules it lacks get zeros."""
    import numpy as np

    variables = lora_variables(state)
    names = sorted(variables)
    unknown = set(weights) - {n.rsplit(".", 1)[0] for n in names}
    assert not unknown, f"no LoRA slots for {sorted(unknown)[:4]}"
    values = []
    for name in names:
        module, which = name.rsplit(".", 1)
        stack = variables[name].get_value()
        host = weights.get(module)
        value = np.zeros(stack.shape[1:], np.float32) if host is None else host["ab".index(which)]
        assert value.shape == stack.shape[1:], (name, value.shape, stack.shape)
        values.append(value)
    new = _set_slot([variables[n].get_value() for n in names], jnp.int32(slot), values)
    for name, array in zip(names, new):
        variables[name].set_value(array)
