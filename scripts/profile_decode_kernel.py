"""Where one decode call of the Mosaic GPU ragged paged attention spends device time (GPU machine).

  python3 scripts/profile_decode_kernel.py --batch 64 --ctx 1024 [--variant 64x2] [--splits N]

Traces 20 back-to-back calls (benchmarks.common.trace_device) and prints the device and wall time
per call, then the device time per call of each op: the Pallas kernel and the wrapper's XLA ops.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import trace_device
from benchmarks.kernels import H, make_sets, pool, variant_kwargs
from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_mosaic

CALLS = 20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--variant", default="64x2")
    p.add_argument("--splits", type=int, default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    pool_pages = max(args.batch * -(-args.ctx // 16), 16384)
    k, v = pool(pool_pages)
    qs, tables, kv_lens, cu = make_sets(rng, q_lens=[1] * args.batch,
                                        kv_lens=[args.ctx] * args.batch,
                                        num_sets=2, pool_pages=pool_pages)
    ns = jnp.asarray([args.batch], jnp.int32)
    fn = jax.jit(functools.partial(ragged_paged_attention_mosaic, sm_scale=H ** -0.5,
                                   num_kv_splits=args.splits, **variant_kwargs(args.variant)))
    sets = [(qs[i], k, v, kv_lens, tables[i], cu, ns) for i in range(2)]  # sliced outside the trace
    jax.block_until_ready(fn(*sets[0]))  # compile + warm-up

    def run():
        for i in range(CALLS):
            out = fn(*sets[i % 2])
        jax.block_until_ready(out)

    summary, wall = trace_device(run)
    us = summary["busy_ms"] * 1e3 / CALLS
    kv_bytes = 2 * args.batch * args.ctx * 8 * H * 2
    print(f"b{args.batch} c{args.ctx} {args.variant} splits={args.splits}: {us:.1f} us per call "
          f"(device), {wall * 1e6 / CALLS:.1f} us (wall), {kv_bytes / us / 1e3:.0f} GB/s of K/V")
    for name, ms in summary["top_ops_ms"]:
        print(f"  {ms * 1e3 / CALLS:8.1f} us/call  {name[:90]}")


if __name__ == "__main__":
    main()
