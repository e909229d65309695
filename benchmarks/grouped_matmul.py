"""Grouped matmul micro-benchmark (issue 18): the Pallas kernel (kernels_pallas/grouped_matmul) vs
jax.lax.ragged_dot vs a dense masked reference, at Mixtral-8x7B and Qwen3-30B-A3B expert shapes.

python -m benchmarks.grouped_matmul [--out DIR] [--tokens 1,256,4096,16384] [--tiles auto,16,64x64]
                                    [--models mixtral,qwen3-moe] [--iters 20] [--no-layer] [--quick]
For each model, token count T (M = T * top_k rows, routed uniformly at random to distinct experts
per token) and projection ("up": [M, D] x [E, D, F], the gate/up shape; "down": [M, F] x [E, F, D]):
wall time per call (jax.block_until_ready after `iters` back-to-back calls, one warm-up call
first), TFLOP/s of the useful 2*M*K*N, GB/s of the distinct experts' weights read, and each
result's relative error against the dense one (so a miscompiled kernel shows). "dense" runs every
expert over every row and keeps each row's own expert (E times the flops; skipped above
--dense-max-tflop). A method that fails (ragged_dot's dense lowering runs out of memory at these
shapes on XLA:GPU) records its error and the run goes on. Then (proj "layer") one whole MoE block,
models.moe.grouped_experts (routing sort, gate/up/down, weighted sum), with impl pallas vs xla
(ragged_dot), relative error against models.moe.experts_reference where --dense-max-tflop allows.
Writes grouped_matmul.json to --out.
--quick: shapes / 16 and few tokens, for a CPU smoke run (kernel interpreted).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.grouped_matmul.kernel import grouped_matmul_pallas
from models.moe import experts_reference, grouped_experts, route

# name: (num_experts E, top_k, hidden D, expert ffw F)
MODELS = {"mixtral": (8, 2, 4096, 14336), "qwen3-moe": (128, 8, 2048, 768)}


def routed_rows(rng, T, E, top_k):
    """Group sizes i32[E] of T tokens each sent to top_k distinct random experts."""
    ids = np.argsort(rng.random((T, E)), axis=1)[:, :top_k]
    return jnp.asarray(np.bincount(ids.ravel(), minlength=E), jnp.int32)


def dense_masked(lhs, rhs, group_sizes):
    """Every expert over every row, each row keeping its own expert's result (f32 accumulate)."""
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")

    def one(g, out):
        y = jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32)
        return jnp.where((row_group == g)[:, None], y, out)

    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    return jax.lax.fori_loop(0, rhs.shape[0], one, out).astype(lhs.dtype)


def timed_us(fn, args, iters):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters * 1e6


def methods(tiles, interpret):
    """{name: jitted (lhs, rhs, group_sizes) -> out}; tiles: "auto", "BM" or "BMxBN" each."""
    fns = {}
    for tile in tiles:
        bm, _, bn = tile.partition("x")
        block_m, block_n = (None if bm == "auto" else int(bm)), (int(bn) if bn else None)
        fns[f"pallas_{tile}"] = jax.jit(
            lambda x, w, s, block_m=block_m, block_n=block_n: grouped_matmul_pallas(
                x, w, s, block_m=block_m, block_n=block_n, interpret=interpret))
    fns["ragged_dot"] = jax.jit(jax.lax.ragged_dot)
    fns["dense"] = jax.jit(dense_masked)
    return fns


def bench_case(model, T, proj, fns, args, rng):
    E, top_k, D, F = MODELS[model]
    if args.quick:
        D, F = max(64, D // 16), max(64, F // 16)
    K, N = (D, F) if proj == "up" else (F, D)
    M = T * top_k
    sizes = routed_rows(rng, T, E, top_k)
    lhs = jnp.asarray(rng.standard_normal((M, K), np.float32), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((E, K, N), np.float32) / np.sqrt(K), jnp.bfloat16)
    used = int(np.count_nonzero(np.asarray(sizes)))
    row = {"model": model, "tokens": T, "proj": proj, "M": M, "K": K, "N": N, "E": E,
           "experts_used": used, "useful_tflop": 2 * M * K * N / 1e12}
    outs = {}
    for name, fn in fns.items():
        if name == "dense" and 2 * M * K * N * E / 1e12 > args.dense_max_tflop:
            row["dense_skipped"] = f"{2 * M * K * N * E / 1e12:.1f} TFLOP > --dense-max-tflop"
            continue
        try:
            us = timed_us(fn, (lhs, rhs, sizes), args.iters)
            outs[name] = np.asarray(fn(lhs, rhs, sizes), np.float32)
        except Exception as e:  # ragged_dot's dense lowering: out of memory while compiling
            row[name + "_error"] = repr(e)[:300]
            continue
        row[name + "_us"] = us
        row[name + "_tflops"] = 2 * M * K * N / us / 1e6
        row[name + "_weight_gbps"] = used * K * N * 2 / us / 1e3
    want = outs.get("dense", outs.get("ragged_dot"))
    if want is not None:
        for name, got in outs.items():
            row[name + "_rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(json.dumps(row), flush=True)
    return row


def bench_layer(model, T, args, rng):
    """One MoE block's experts (models.moe.grouped_experts) per grouped-matmul impl."""
    E, top_k, D, F = MODELS[model]
    if args.quick:
        D, F = max(64, D // 16), max(64, F // 16)
    x = jnp.asarray(rng.standard_normal((T, D), np.float32), jnp.bfloat16)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((E, D, F), np.float32) / np.sqrt(D),
                                jnp.bfloat16) for _ in "gu")
    w_down = jnp.asarray(rng.standard_normal((E, F, D), np.float32) / np.sqrt(F), jnp.bfloat16)
    weights, ids = route(jnp.asarray(rng.standard_normal((T, E), np.float32)), top_k, True)
    params = (x, weights, ids, w_gate, w_up, w_down)
    row = {"model": model, "tokens": T, "proj": "layer", "M": T * top_k, "D": D, "F": F, "E": E,
           "useful_tflop": 6 * T * top_k * D * F / 1e12}
    outs = {}
    for impl in ("pallas", "xla"):
        fn = jax.jit(lambda *a, impl=impl: grouped_experts(*a, jnp.int32(0), impl=impl))
        try:
            row[impl + "_us"] = timed_us(fn, params, args.iters)
            outs[impl] = np.asarray(fn(*params), np.float32)
        except Exception as e:  # ragged_dot's dense lowering: out of memory while compiling
            row[impl + "_error"] = repr(e)[:300]
    if 6 * T * D * F * E / 1e12 <= args.dense_max_tflop:
        want = np.asarray(jax.jit(experts_reference)(*params), np.float32)
        for impl, got in outs.items():
            row[impl + "_rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--models", default="mixtral,qwen3-moe")
    ap.add_argument("--tokens", default="1,256,4096,16384", help="decode and prefill token counts")
    ap.add_argument("--projs", default="up,down")
    ap.add_argument("--tiles", default="auto",
                    help="comma list of kernel tiles: auto, BM or BMxBN (powers of two >= 16)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dense-max-tflop", type=float, default=20.0)
    ap.add_argument("--no-layer", action="store_true", help="skip the whole-MoE-block rows")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small shapes")
    args = ap.parse_args()
    interpret = jax.default_backend() != "gpu"
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.quick:
        tokens, args.iters = [min(t, 16) for t in tokens[:2]], min(args.iters, 2)
    fns = methods(args.tiles.split(","), interpret)
    rng = np.random.default_rng(0)
    rows = [bench_case(model, T, proj, fns, args, rng) for model in args.models.split(",")
            for T in tokens for proj in args.projs.split(",")]
    if not args.no_layer:
        rows += [bench_layer(model, T, args, rng) for model in args.models.split(",")
                 for T in tokens]
    result = {"args": vars(args), "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "grouped_matmul.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
