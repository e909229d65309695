"""A step's host inputs in two transfers: every numpy array of the step's arguments packed into one
int32 and one float32 buffer on the host, and unpacked inside the jitted step by static offsets.

Why: a step has ~25 small numpy inputs (token ids, positions, slot mapping, page table, sampling
settings, ...), and each becomes its own host-to-device copy at the call. On the lent H200 every
driver call is expensive (with XLA's command buffers off, a step's launch took 23.5 ms for ~600
kernels), and `dispatch` took 9-15 ms per step of which building the arrays was ~1.2 ms
(benchmarks/RESULTS.md, sessions 5 and 6). Packing leaves two copies per step whatever the inputs.

int32, uint32 (bit-cast) and bool (0/1) arrays go to the int32 buffer, float32 arrays to the float32
one; device arrays (and abstract ShapeDtypeStructs when lowering) pass through unchanged. The layout
(`PackSpec`) depends only on the inputs' pytree structure, shapes and dtypes, so it is static: one
compiled step per layout, as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INT_DTYPES = (np.dtype(np.int32), np.dtype(np.uint32), np.dtype(np.bool_))
_F32 = np.dtype(np.float32)
# Every leaf starts at a multiple of 64 elements (256 bytes): XLA passes a slice of a parameter to
# a custom call as a pointer into the buffer, and the Mosaic GPU attention kernel refuses a buffer
# that is not 256-byte aligned ("Input buffer 1 is not 256-byte aligned" on the H200 at a page
# table of 64 columns: the engine failed its first step).
ALIGN = 64


@dataclass(frozen=True)
class PackSpec:
    """Where each leaf of the inputs lives: ("i32" | "f32", offset, shape, dtype name) for a packed
    numpy array, ("device", index, shape, dtype name) for an array passed through."""

    treedef: Any
    leaves: tuple[tuple[str, int, tuple[int, ...], str], ...]


def pack(args) -> tuple[PackSpec, np.ndarray, np.ndarray, tuple]:
    """args (a pytree) -> (spec, i32[n], f32[m], device leaves)."""
    leaves, treedef = jax.tree.flatten(args)
    specs, device = [], []
    parts: dict[str, list] = {"i32": [], "f32": []}  # (offset, flat int32 / float32 values)
    sizes = {"i32": 0, "f32": 0}
    for x in leaves:
        if isinstance(x, np.ndarray) and (x.dtype in _INT_DTYPES or x.dtype == _F32):
            where = "f32" if x.dtype == _F32 else "i32"
            specs.append((where, sizes[where], x.shape, x.dtype.name))
            flat = x.ravel().view(np.int32) if x.dtype == np.uint32 else x.ravel()
            parts[where].append((sizes[where], flat))
            sizes[where] += -(-x.size // ALIGN) * ALIGN
        else:  # a device array, an abstract one, or a numpy dtype the buffers do not carry
            specs.append(("device", len(device), tuple(x.shape), str(x.dtype)))
            device.append(x)
    i32, f32 = np.zeros(sizes["i32"], np.int32), np.zeros(sizes["f32"], np.float32)
    for buf, where in ((i32, "i32"), (f32, "f32")):
        for offset, flat in parts[where]:
            buf[offset:offset + flat.size] = flat
    return PackSpec(treedef, tuple(specs)), i32, f32, tuple(device)


def unpack(spec: PackSpec, i32: jax.Array, f32: jax.Array, device: tuple):
    """Inside the jitted step: the pytree `pack` was given (as jax arrays)."""
    leaves = []
    for where, offset, shape, dtype in spec.leaves:
        if where == "device":
            leaves.append(device[offset])
            continue
        flat = (i32 if where == "i32" else f32)[offset:offset + math.prod(shape)]
        x = flat.reshape(shape)
        if dtype == "uint32":
            x = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif dtype == "bool":
            x = x != 0
        leaves.append(x)
    return jax.tree.unflatten(spec.treedef, leaves)


def packed(fn, num_leading: int, place=None):
    """fn(*leading, *args, *trailing) -> a function of (*leading, spec, i32, f32, device, *trailing)
    that unpacks `args` inside (jit it with spec static); place(array), e.g. replicated on the
    mesh, pins the two buffers and every array cut from them, so that the compiler never splits a
    buffer and then moves slices between devices (at TP=2 it did: collective-permutes of the
    sampler's [B] rows, tests/test_tp_collectives.py)."""
    def call(*a):
        spec, i32, f32, device = a[num_leading:num_leading + 4]
        if place is not None:
            i32, f32 = place(i32), place(f32)
        args = unpack(spec, i32, f32, device)
        if place is not None:
            cut = [where != "device" for where, *_ in spec.leaves]
            leaves, treedef = jax.tree.flatten(args)
            args = jax.tree.unflatten(treedef, [place(x) if c else x for x, c in zip(leaves, cut)])
        return fn(*a[:num_leading], *args, *a[num_leading + 4:])
    return call
