"""Quantized matmul benchmark: bf16 vs fp8 W8A8 vs int4 (Pallas kernel and dequantize + XLA) on
Llama-3-8B's projection shapes at decode (M = 1..64) and prefill row counts, on one GPU.

python -m benchmarks.quant [--out DIR] [--ms 1,8,32,64,512] [--tiles auto,64x4] [--quick]
python -m benchmarks.quant --e2e fp8 [--kv-cache-dtype fp8] [--model llama-3-8b] [--batch-sizes 1,64]
Device time by benchmarks.common.device_us with several weight copies rotated (so no weight sits in
L2), next to each weight's floor (its bytes / measured copy bandwidth) and each result's relative
error against the f32 reference (so a miscompiled kernel shows). Also sums one decode token's 7
projections x 32 layers per method (the matmul part of Llama-3-8B batch-1 decode). Writes
quant.json and quant.png. On CPU (smoke run) it falls back to wall-clock time, kernel interpreted.
--e2e METHOD (none | fp8 | awq | gptq) instead times whole decode steps of the engine on a dummy
preset (benchmarks.latency.measure), next to the floor of its actual weight bytes (every param
leaf, quantized or not) plus KV bytes over the copy bandwidth; one method per process (each engine
takes the GPU's memory), written to quant_e2e_<method>_kv<dtype>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_us, environment, measure_copy_bandwidth
from kernels_pallas.quant_matmul.kernel import int4_matmul_pallas
from kernels_pallas.quant_matmul.reference import int4_matmul_reference, int4_matmul_xla
from models.linear import fp8_matmul
from models.quant import pack_int4, quantize_fp8

# Llama-3-8B projections (in, out) and how many per layer; 32 layers.
SHAPES = {"q/o 4096x4096": (4096, 4096, 2), "k/v 4096x1024": (4096, 1024, 2),
          "gate/up 4096x14336": (4096, 14336, 2), "down 14336x4096": (14336, 4096, 1)}
NUM_LAYERS = 32
GROUP = 128
L2_BYTES = 64 << 20  # rotate weight copies until they exceed the H200's 50 MB L2


def make_weights(rng, I, O, copies):
    """copies x {bf16 [I, O], fp8 [O, I] + scale, int4 packed + scales/zeros} of one random w."""
    sets = []
    for _ in range(copies):
        w = (rng.standard_normal((O, I), np.float32) * 0.02).astype(np.float32)
        fp8 = quantize_fp8(w)
        wg = w.T.reshape(I // GROUP, GROUP, O)
        lo, hi = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
        scales = ((hi - lo) / 15).astype(np.float16)
        zeros = np.clip(np.round(-lo / scales.astype(np.float32)), 0, 15)
        q = np.clip(np.round(wg / scales.astype(np.float32)[:, None]) + zeros[:, None], 0, 15)
        sets.append(dict(
            bf16=jnp.asarray(w.T, jnp.bfloat16),
            fp8=(jnp.asarray(fp8.values), jnp.asarray(fp8.scales[:, 0])),
            int4=(jnp.asarray(pack_int4(q.reshape(I, O).astype(np.uint8), GROUP)),
                  jnp.asarray(scales), jnp.asarray(zeros.astype(np.float16)))))
    return sets


def timed(fn, arg_sets, calls):
    """Device us per call on GPU; wall us per call elsewhere (smoke runs)."""
    if jax.default_backend() == "gpu":
        return device_us(fn, arg_sets, calls)[0]
    jax.block_until_ready(fn(*arg_sets[0]))
    start = time.perf_counter()
    for i in range(calls):
        out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e6


def bench_shape(name, I, O, ms, tiles, rng, copy_bps, calls):
    bf16_bytes = I * O * 2
    copies = max(1, min(8, -(-L2_BYTES // (I * O // 2))))  # int4 copies must exceed L2 too
    sets = make_weights(rng, I, O, copies)
    interpret = jax.default_backend() != "gpu"
    methods = {
        "bf16": (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
                 lambda s: (s["bf16"],), bf16_bytes),
        "fp8": (fp8_matmul, lambda s: s["fp8"], I * O + O * 4),
        "int4_xla": (lambda x, q, s, z: int4_matmul_xla(x, q, s, z, group_size=GROUP),
                     lambda s: s["int4"], I * O // 2 + 2 * (I // GROUP) * O * 2),
    }
    for tile in tiles:
        bn, ns = (None, None) if tile == "auto" else map(int, tile.split("x"))
        methods[f"int4_pallas_{tile}"] = (
            lambda x, q, s, z, bn=bn, ns=ns: int4_matmul_pallas(
                x, q, s, z, group_size=GROUP, block_n=bn, num_splits=ns, interpret=interpret),
            lambda s: s["int4"], I * O // 2 + 2 * (I // GROUP) * O * 2)
    rows = []
    for M in ms:
        x = jnp.asarray(rng.standard_normal((M, I), np.float32), jnp.bfloat16)
        want = np.asarray(int4_matmul_reference(x, *sets[0]["int4"], group_size=GROUP), np.float32)
        w_f32 = np.asarray(sets[0]["bf16"], np.float32)
        row = {"shape": name, "M": M, "in": I, "out": O}
        for method, (fn, args_of, nbytes) in methods.items():
            if method.startswith("int4_pallas") and M > 64 and not interpret:
                continue  # decode kernel: prefill-shaped inputs take int4_xla
            jfn = jax.jit(fn)
            try:
                us = timed(jfn, [(x, *args_of(s)) for s in sets], calls)
                out = np.asarray(jfn(x, *args_of(sets[0])), np.float32)
            except Exception as e:  # a tile the kernel refuses: record and go on
                row[method + "_error"] = repr(e)[:200]
                continue
            ref = want if method.startswith("int4") else np.asarray(x, np.float32) @ w_f32
            row[method + "_us"] = us
            row[method + "_floor_us"] = nbytes / copy_bps * 1e6
            row[method + "_rel_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decode_token_totals(rows, counts) -> dict:
    """Sum over one batch-1 decode token's projections (all 32 layers) per method, us."""
    totals = {}
    for row in rows:
        if row["M"] != 1:
            continue
        for key, value in row.items():
            if key.endswith("_us"):
                totals[key] = totals.get(key, 0.0) + value * counts[row["shape"]] * NUM_LAYERS
    return totals


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    methods = sorted({k[:-3] for r in rows for k in r if k.endswith("_us")
                      and not k.endswith("floor_us")})
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        speedup = [r["bf16_us"] / r[m + "_us"] if m + "_us" in r else 0 for r in rows]
        ax.bar(np.arange(len(rows)) + i * width, speedup, width, label=m)
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(np.arange(len(rows)) + 0.4,
                  [f"{r['shape'].split()[0]}\nM={r['M']}" for r in rows], fontsize=7)
    ax.set_ylabel("speed-up over bf16 (device time)")
    ax.set_title(f"quantized matmuls, Llama-3-8B shapes, {result['env']['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def e2e(args):
    """Batch decode TPOT of the engine with one quantization method, vs its bytes floor."""
    from benchmarks import common
    from benchmarks.latency import measure
    from jaxserve import LLM

    common.log_engine_progress()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    bw = measure_copy_bandwidth() if jax.default_backend() == "gpu" else 20e9
    input_len, output_len = args.input_len, args.output_len
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16",
              quantization=None if args.e2e == "none" else args.e2e,
              kv_cache_dtype=args.kv_cache_dtype, max_model_len=input_len + output_len + 16,
              max_num_seqs=max(batches), max_num_batched_tokens=max(2048, input_len * max(batches)))
    engine = llm.llm_engine
    w_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(engine.runner.state))
    kv_item = engine.runner.kv_cache.k[0].dtype.itemsize
    for b in batches:
        measure(engine, b, input_len, 4, seed=1000 + b)  # compile every bucket first
    rows = []
    for b in batches:
        r = measure(engine, b, input_len, output_len, seed=b)
        kv = b * (input_len + output_len / 2) * common.kv_bytes_per_token(engine.model_config,
                                                                         kv_item)
        r["tpot_floor_s"] = (w_bytes + kv) / bw
        rows.append(r)
        print(f"{args.e2e} kv={args.kv_cache_dtype} batch {b}: TPOT {1e3 * r['tpot_s']:.3f} ms, "
              f"floor {1e3 * r['tpot_floor_s']:.3f} ms ({r['tpot_s'] / r['tpot_floor_s']:.2f}x), "
              f"weights {w_bytes / 1e9:.2f} GB", flush=True)
    result = {"args": vars(args), "env": environment(), "copy_gbps": bw / 1e9,
              "weight_bytes": w_bytes, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"quant_e2e_{args.e2e}_kv{args.kv_cache_dtype}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--e2e", choices=["none", "fp8", "awq", "gptq"],
                    help="time engine decode steps with this method instead of matmuls")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--model", default="llama-3-8b", help="dummy preset for --e2e")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--ms", default="1,8,32,64,512")
    ap.add_argument("--tiles", default="auto,64x4,128x8,32x8",
                    help="int4 kernel tiles block_n x num_splits ('auto': default_tiles)")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="one shape, M=1 and 8 (smoke run)")
    args = ap.parse_args()
    if args.e2e:
        return e2e(args)
    rng = np.random.default_rng(0)
    ms = [int(m) for m in args.ms.split(",")]
    shapes = dict(SHAPES)
    if args.quick:
        ms, shapes = [1, 8], {"k/v 4096x1024": SHAPES["k/v 4096x1024"]}
        if jax.default_backend() != "gpu":
            shapes = {"smoke 512x256": (512, 256, 1)}
    on_gpu = jax.default_backend() == "gpu"
    copy_bps = measure_copy_bandwidth() if on_gpu else 20e9
    result = {"env": environment(), "copy_gbps": copy_bps / 1e9, "group_size": GROUP, "rows": []}
    for name, (I, O, _) in shapes.items():
        result["rows"] += bench_shape(name, I, O, ms, args.tiles.split(","), rng, copy_bps,
                                      args.calls)
    result["decode_token_us"] = decode_token_totals(result["rows"],
                                                    {k: v[2] for k, v in shapes.items()})
    print("batch-1 decode, all projections of 32 layers (us):",
          json.dumps(result["decode_token_us"], indent=1))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quant.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'quant.json')}")
    try:
        plot(result, os.path.join(args.out, "quant.png"))
    except ImportError as e:
        print("no plot:", e)


if __name__ == "__main__":
    main()
