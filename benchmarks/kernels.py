"""Kernel benchmarks: ragged paged attention (decode and prefill) on one GPU.

python -m benchmarks.kernels [--out DIR] [--variants auto,64x2] [--prefill-variants ...] [--quick]
Times our Mosaic GPU kernel, JAX's old Pallas paged_attention (Triton) and the XLA reference on
Llama-3-8B attention shapes (32 q / 8 kv heads, head_dim 128, page 16, bf16, random permuted page
tables), next to a measured device copy bandwidth and bf16 matmul rate. Writes JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_us, environment, measure_copy_bandwidth, measure_matmul_rate
from kernels_pallas.ragged_paged_attention.kernel_gpu import ragged_paged_attention_mosaic
from kernels_pallas.ragged_paged_attention.reference import ragged_paged_attention_reference

N, K, H, S = 32, 8, 128, 16
DT = jnp.bfloat16


def time_device(fn, stacked, *shared, calls=20):
    """device_us of fn(*x_i, *shared) over the stacked input sets x_i (rotated, so K/V don't sit in
    L2). Replaces a jitted lax.scan over the sets, whose while loop added a host round trip per
    iteration (~50 us at batch 64, context 1024, measured against this trace on the H100)."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    sets = [jax.tree.map(lambda a, i=i: a[i], stacked) + tuple(shared) for i in range(n)]
    return device_us(jax.jit(fn), sets, calls)


def make_sets(rng, *, q_lens, kv_lens, num_sets, pool_pages):
    """num_sets (q, page_table) sets over one shared page pool; each table is a random sample."""
    B, M = len(q_lens), max(-(-n // S) for n in kv_lens)
    T = int(sum(q_lens))
    tables = np.stack([rng.permutation(pool_pages)[:B * M].reshape(B, M) for _ in range(num_sets)])
    qs = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (num_sets, T, N, H), DT)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return qs, jnp.asarray(tables, jnp.int32), jnp.asarray(kv_lens, jnp.int32), cu


def pool(pool_pages):
    k = jax.random.normal(jax.random.key(3), (pool_pages, S, K, H), DT)
    v = jax.random.normal(jax.random.key(4), (pool_pages, S, K, H), DT)
    return k, v


def variant_kwargs(variant: str) -> dict:
    """"auto": the defaults the engine gets. Otherwise [w]BKVxST[e][n]: "w" the warp-specialized
    (FA3-style) kernel, else the one-warpgroup kernel; block_kv BKV and ST stages; "e"
    early_k_refill; "n" heavy_first off. E.g. "64x2", "w128x2"."""
    if variant == "auto":
        return {}
    body = variant.lstrip("w").rstrip("en")
    bkv, st = (int(x) for x in body.split("x"))
    tail = variant[variant.index(body) + len(body):]
    return dict(block_kv=bkv, num_stages=st, warp_specialized=variant.startswith("w"),
                early_k_refill="e" in tail, heavy_first="n" not in tail)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bench_decode(batch, ctx, variants, rng, with_ref, baselines=True):
    M = -(-ctx // S)
    pool_pages = max(batch * M, 16384)  # >= 1 GiB of K+V, far above L2
    num_sets = max(2, min(16, (1 << 31) // (batch * ctx * K * H * 4)))
    k, v = pool(pool_pages)
    qs, tables, kv_lens, cu = make_sets(rng, q_lens=[1] * batch, kv_lens=[ctx] * batch,
                                        num_sets=num_sets, pool_pages=pool_pages)
    ns = jnp.asarray([batch], jnp.int32)
    kv_bytes = 2 * batch * ctx * K * H * 2
    row = dict(batch=batch, ctx=ctx, kv_bytes=kv_bytes)
    ref_out = ragged_paged_attention_reference(qs[0], k, v, kv_lens, tables[0], cu, ns,
                                               sm_scale=H ** -0.5)
    for variant in variants:
        fn = functools.partial(ragged_paged_attention_mosaic, sm_scale=H ** -0.5,
                               **variant_kwargs(variant))
        name = f"ours_{variant}"
        try:
            row[name + "_err"] = rel_err(fn(qs[0], k, v, kv_lens, tables[0], cu, ns), ref_out)
            row[name + "_us"], row[name + "_wall_us"] = time_device(
                lambda q, tb, k, v: fn(q, k, v, kv_lens, tb, cu, ns), (qs, tables), k, v)
        except Exception as e:  # noqa: BLE001 - report and keep benchmarking the others
            row[name + "_error"] = repr(e)[:300]
    if not baselines:
        return row
    try:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        kt, vt = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)  # [K, P, S, H]
        splits = max(1, min(16, M // 8))
        jfn = functools.partial(paged_attention, k_splits=splits, pages_per_compute_block=min(8, M))
        row["jax_err"] = rel_err(jfn(qs[0] * H ** -0.5, kt, vt, tables[0], kv_lens), ref_out)
        row["jax_us"], row["jax_wall_us"] = time_device(
            lambda q, tb, k, v: jfn(q * H ** -0.5, k, v, tb, kv_lens), (qs, tables), kt, vt)
        del kt, vt
    except Exception as e:  # noqa: BLE001
        row["jax_error"] = repr(e)[:300]
    if with_ref:
        rfn = functools.partial(ragged_paged_attention_reference, sm_scale=H ** -0.5)
        row["xla_us"], _ = time_device(lambda q, tb, k, v: rfn(q, k, v, kv_lens, tb, cu, ns),
                                       (qs[:2], tables[:2]), k, v, calls=4)
    return row


def bench_prefill(q_len, ctx, variants, rng):
    M = -(-ctx // S)
    pool_pages = max(M, 4096)
    k, v = pool(pool_pages)
    qs, tables, kv_lens, cu = make_sets(rng, q_lens=[q_len], kv_lens=[ctx], num_sets=4,
                                        pool_pages=pool_pages)
    ns = jnp.asarray([1], jnp.int32)
    pos = np.arange(ctx - q_len, ctx)
    flops = 4 * N * H * float(np.sum(pos + 1))  # causal: QK^T and PV over visible keys only
    row = dict(q_len=q_len, ctx=ctx, flops=flops)
    # The reference materialises [T, ctx, K, H] in f32: check only the last 256 tokens, as a chunk.
    tail = min(q_len, 256)
    ref_tail = ragged_paged_attention_reference(
        qs[0][-tail:], k, v, kv_lens, tables[0], jnp.asarray([0, tail], jnp.int32), ns,
        sm_scale=H ** -0.5)
    for variant in variants:
        fn = functools.partial(ragged_paged_attention_mosaic, sm_scale=H ** -0.5,
                               **variant_kwargs(variant))
        name = f"ours_{variant}"
        try:
            out = fn(qs[0], k, v, kv_lens, tables[0], cu, ns)
            row[name + "_err"] = rel_err(out[-tail:], ref_tail)
            row[name + "_us"], row[name + "_wall_us"] = time_device(
                lambda q, tb, k, v: fn(q, k, v, kv_lens, tb, cu, ns), (qs, tables), k, v)
        except Exception as e:  # noqa: BLE001
            row[name + "_error"] = repr(e)[:300]
    if q_len == ctx:
        jax_fa3(row, qs, k, v, tables, ref_tail)
    return row


def jax_fa3(row, qs, k, v, tables, ref_tail):
    """JAX's own FlashAttention-3 (pallas/ops/gpu/attention_mgpu.py, dense causal, contiguous K/V)
    on the same prompt: what Mosaic GPU reaches without a page table. Its shared-memory buffers
    are float16 only, so it runs in float16 (the same tensor-core rate as bfloat16)."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3
        T = qs.shape[1]
        f16 = functools.partial(jnp.asarray, dtype=jnp.float16)
        kc = f16(jnp.take(k, tables[0], axis=0).reshape(1, -1, K, H)[:, :T])
        vc = f16(jnp.take(v, tables[0], axis=0).reshape(1, -1, K, H)[:, :T])
        cfg = fa3.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
        fn = jax.jit(lambda q, k, v: fa3.attention(q[None], k, v, config=cfg)[0])
        qs = f16(qs * H ** -0.5)  # it has no softmax scale: scale q once, outside the timing
        row["jax_fa3_err"] = rel_err(fn(qs[0], kc, vc)[-ref_tail.shape[0]:], ref_tail)
        row["jax_fa3_us"], _ = time_device(fn, (qs,), kc, vc)
    except Exception as e:  # noqa: BLE001
        row["jax_fa3_error"] = repr(e)[:300]


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["decode"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    labels = [f"b{r['batch']}\nc{r['ctx']}" for r in rows]
    keys = sorted({k[:-3] for r in rows for k in r if k.endswith("_us")})
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        bw = [r["kv_bytes"] / r[key + "_us"] / 1e3 if key + "_us" in r else 0 for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, bw, width, label=key)
    ax.axhline(result["copy_gbps"], color="k", ls="--", label="device copy")
    ax.set_xticks(np.arange(len(rows)) + 0.4, labels, fontsize=7)
    ax.set_ylabel("K/V GB/s")
    ax.set_title(f"decode ragged paged attention, {result['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    global S
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--variants", default="64x2,64x3")
    ap.add_argument("--prefill-variants", help="variants for the prefill rows (default: --variants)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--page-size", type=int, default=S)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--ctxs", default="128,1024,4096")
    ap.add_argument("--no-baselines", action="store_true", help="skip the JAX and XLA kernels")
    args = ap.parse_args()
    S = args.page_size
    os.makedirs(args.out, exist_ok=True)
    variants = args.variants.split(",")
    rng = np.random.default_rng(0)
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  variants=args.variants, page_size=S, env=environment())
    result["copy_gbps"] = measure_copy_bandwidth() / 1e9
    result["matmul_tflops"] = measure_matmul_rate() / 1e12
    print(f"device {result['device']}: copy {result['copy_gbps']:.0f} GB/s, "
          f"bf16 matmul {result['matmul_tflops']:.0f} TFLOP/s", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    ctxs = [int(c) for c in args.ctxs.split(",")]
    if args.quick:
        batches, ctxs = [8, 64], [1024]
    result["decode"] = []
    for b in batches:
        for c in ctxs:
            row = bench_decode(b, c, variants, rng, with_ref=b * c <= 64 * 4096,
                               baselines=not args.no_baselines)
            result["decode"].append(row)
            print(json.dumps(row), flush=True)
    result["prefill"] = []
    for q_len, ctx in [(512, 4096), (4096, 4096)]:
        row = bench_prefill(q_len, ctx, (args.prefill_variants or args.variants).split(","), rng)
        result["prefill"].append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, os.path.join(args.out, "kernels_decode.png"))
    except ImportError as e:
        print("no plot:", e)
    print_table(result)


def print_table(result):
    """Device time per call (kernel + wrapper ops); the wall column adds host dispatch."""
    cp = result["copy_gbps"]
    print(f"\n{'batch':>5} {'ctx':>5} | {'variant':>10} {'us':>8} {'GB/s':>6} {'%copy':>6} "
          f"{'wall us':>8} | {'jax us':>7} {'jax/ours':>8} | {'xla us':>8}")
    for r in result["decode"]:
        for key in sorted(k[:-3] for k in r if k.startswith("ours") and k.endswith("_us")
                          and not k.endswith("_wall_us")):
            us = r[key + "_us"]
            gbps = r["kv_bytes"] / us / 1e3
            jax_us = r.get("jax_us", float("nan"))
            print(f"{r['batch']:>5} {r['ctx']:>5} | {key:>10} {us:8.1f} {gbps:6.0f} "
                  f"{100 * gbps / cp:5.0f}% {r.get(key + '_wall_us', float('nan')):8.1f} | "
                  f"{jax_us:7.1f} {jax_us / us:7.2f}x | {r.get('xla_us', float('nan')):8.1f}"
                  f"  err {r.get(key + '_err', -1):.1e}")
    for r in result["prefill"]:
        keys = sorted(k[:-3] for k in r if k.startswith("ours") and k.endswith("_us")
                      and not k.endswith("_wall_us"))
        for key in keys + (["jax_fa3"] if "jax_fa3_us" in r else []):
            tf = r["flops"] / r[key + "_us"] / 1e6
            print(f"prefill q{r['q_len']} ctx{r['ctx']} {key}: {r[key + '_us']:.0f} us "
                  f"{tf:.0f} TFLOP/s ({100 * tf / result['matmul_tflops']:.0f}% of matmul) "
                  f"err {r.get(key + '_err', -1):.1e}")

if __name__ == "__main__":
    main()
