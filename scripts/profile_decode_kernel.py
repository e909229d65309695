"""Where one decode call of the Mosaic GPU ragged paged attention spends device time (GPU machine).

  python3 scripts/profile_decode_kernel.py --batch 64 --ctx 1024 [--variant 64x2] [--splits N]

Times 50 back-to-back calls (wall), then traces 20 more with jax.profiler (device activity only)
and prints device time per call for each op: the Pallas kernel and the wrapper's XLA ops.
"""
from __future__ import annotations

import argparse
import functools
import glob
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import H, make_sets, pool, variant_kwargs
from benchmarks.common import busy_fraction
from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_mosaic


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
    fn(qs[0], k, v, kv_lens, tables[0], cu, ns).block_until_ready()
    t0 = time.perf_counter()
    for i in range(50):
        out = fn(qs[i % 2], k, v, kv_lens, tables[i % 2], cu, ns)
    out.block_until_ready()
    per_call = (time.perf_counter() - t0) / 50
    kv_bytes = 2 * args.batch * args.ctx * 8 * H * 2
    print(f"b{args.batch} c{args.ctx} {args.variant} splits={args.splits}: {per_call * 1e6:.1f} us "
          f"per call (wall, back to back), {kv_bytes / per_call / 1e9:.0f} GB/s of K/V", flush=True)
    trace_dir = tempfile.mkdtemp()
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = 0
    options.python_tracer_level = 0
    with jax.profiler.trace(trace_dir, profiler_options=options):
        for i in range(20):
            out = fn(qs[i % 2], k, v, kv_lens, tables[i % 2], cu, ns)
        out.block_until_ready()
    trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    summary = busy_fraction(trace)
    for name, ms in summary["top_ops_ms"]:
        print(f"  {ms * 1e3 / 20:8.1f} us/call  {name[:90]}")


if __name__ == "__main__":
    main()
