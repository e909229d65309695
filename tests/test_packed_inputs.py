"""jaxserve/packed_inputs.py: a step's numpy inputs packed into one int32 and one float32 buffer
come back inside a jitted function equal to the originals (dtypes, shapes, extremes, empties)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.packed_inputs import ALIGN, pack, unpack


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Meta:
    a: object
    b: object
    flag: bool = dataclasses.field(default=False, metadata={"static": True})


def _args(rng):
    return (rng.integers(-2**31, 2**31, 7, dtype=np.int64).astype(np.int32),
            np.array([0, 1, 2**31, 2**32 - 1], np.uint32),
            np.array([[True, False], [False, True]]),
            rng.standard_normal((3, 5)).astype(np.float32),
            np.array([np.inf, -np.inf, -0.0], np.float32),
            np.zeros((4, 0), np.int32),  # empty
            _Meta(a=rng.integers(0, 9, (2, 3)).astype(np.int32), b=jnp.arange(5.0), flag=True),
            None,  # an absent input (e.g. no penalties)
            jnp.full((2, 2), 7, jnp.int32))  # a device array: passed through


def test_round_trip_inside_jit():
    args = _args(np.random.default_rng(0))
    spec, i32, f32, device = pack(args)
    assert i32.dtype == np.int32 and f32.dtype == np.float32
    packed = [(where, offset, shape) for where, offset, shape, _ in spec.leaves if where != "device"]
    assert len(packed) == 7  # everything numpy is packed: 5 int-like leaves, 2 float32 ones
    # Each leaf starts 256-byte aligned (the Mosaic GPU kernels refuse unaligned input buffers).
    assert ALIGN * 4 == 256 and all(offset % ALIGN == 0 for _, offset, _ in packed)
    assert i32.size == 4 * ALIGN and f32.size == 2 * ALIGN  # the empty leaf takes no room
    assert len(device) == 2  # the two jax arrays
    out = jax.jit(unpack, static_argnums=0)(spec, i32, f32, device)
    flat_in, tree_in = jax.tree.flatten(args)
    flat_out, tree_out = jax.tree.flatten(out)
    assert tree_in == tree_out and out[6].flag is True and out[7] is None
    for x, y in zip(flat_in, flat_out):
        assert np.asarray(y).dtype == np.asarray(x).dtype and y.shape == x.shape
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert np.signbit(np.asarray(out[4])[2])  # -0.0 kept bit for bit


def test_layout_depends_only_on_shapes():
    """Two steps with different values share a spec (one compiled step), a new shape does not."""
    a = pack(_args(np.random.default_rng(1)))[0]
    b = pack(_args(np.random.default_rng(2)))[0]
    assert a == b and hash(a) == hash(b)
    other = list(_args(np.random.default_rng(1)))
    other[0] = np.zeros(8, np.int32)
    assert pack(tuple(other))[0] != a


def test_other_dtypes_pass_through():
    args = (np.arange(3, dtype=np.int64), np.ones(2, np.float16))
    spec, i32, f32, device = pack(args)
    assert i32.size == f32.size == 0 and len(device) == 2
    out = jax.jit(unpack, static_argnums=0)(spec, i32, f32, device)
    np.testing.assert_array_equal(np.asarray(out[0]), args[0])
