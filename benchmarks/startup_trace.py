"""Start-up tracing cost: how long ModelRunner._lower (trace + lower to StableHLO, no compile) takes
per token bucket and sampler variant, for a preset model built from shapes only (no weights, no
KV cache allocated), on whatever backend runs it (CPU is enough: tracing is host Python).

Issue 14: warm-up lowers its 22 step shapes one after the other on one thread, so this is on the
start-up critical path. Per shape it reports the wall seconds of _inputs and _lower, and JAX's own
split of _lower into tracing (Python -> jaxpr) and lowering (jaxpr -> MLIR), and the seconds
Python's cyclic garbage collector ran inside it. --profile runs the
same loop under cProfile and prints where the time goes.

    python -m benchmarks.startup_trace --model llama-3-8b [--platform cuda] [--profile]
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import pstats
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

from benchmarks import common
from jaxserve.runner import ModelRunner
from jaxserve.sharding import ShardingRules, make_mesh
from jaxserve.warmup import paused_gc
from models import config_from_hf
from models.presets import get_preset, preset_names

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_TO_MLIR = "/jax/core/compile/jaxpr_to_mlir_module_duration"


def abstract_runner(model: str, *, max_num_seqs: int, max_num_batched_tokens: int,
                    max_model_len: int, page_size: int = 16, num_pages: int = 4096,
                    attention_impl: str = "reference", dtype: str = "bfloat16",
                    hf_overrides: dict | None = None) -> ModelRunner:
    """A ModelRunner over ShapeDtypeStructs: the preset's params (jaxserve.weights.abstract_model,
    with their shardings) and a KV cache of num_pages pages; nothing large is allocated, so it can
    lower steps but never run them. hf_overrides: HF config keys over the preset's."""
    hf = get_preset(model)
    if hf is None:
        raise ValueError(f"{model=} is not a preset; presets: {', '.join(preset_names())}")
    config = config_from_hf(hf, hf_overrides)
    mesh, rules = make_mesh(1), ShardingRules()
    graphdef, state, kv_cache = common.abstract_state_and_cache(
        config, dtype, mesh, rules, num_pages=num_pages, page_size=page_size)
    return ModelRunner(graphdef, state, kv_cache, vocab_size=config.vocab_size,
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       max_model_len=max_model_len, attention_impl=attention_impl, mesh=mesh)


class _LowerFor:
    """Stands in for one of the runner's jitted steps so that its _lower emits StableHLO for
    `platforms` (e.g. cuda, with the Pallas GPU attention kernel) on a machine without them."""

    def __init__(self, jitted, platforms: tuple[str, ...]):
        self.jitted, self.platforms = jitted, platforms

    def lower(self, *args):
        return self.jitted.trace(*args).lower(lowering_platforms=self.platforms)


def lower_for(runner: ModelRunner, platform: str) -> ModelRunner:
    """The runner, its fused and forward steps lowering for `platform` (not the local backend)."""
    runner._jit = _LowerFor(runner._jit, (platform,))
    runner._jit_forward = _LowerFor(runner._jit_forward, (platform,))
    return runner


def time_lowering(runner: ModelRunner, buckets=None, compile: bool = False) -> list[dict]:
    """Per shape, in warm-up's order (StepWarmup.warmup_shapes), the seconds of _inputs, of
    _lower, JAX's trace and to-MLIR durations inside it (the outermost jit's) and of Python's
    GC (0 under paused_gc); with `compile`, also of compiling it here (serially: a compile's
    own cost)."""
    events: dict[str, float] = {}
    gc_start = [0.0]

    def listen(event: str, seconds: float, **_) -> None:
        if event in (_TRACE, _TO_MLIR):
            events[event] = max(events.get(event, 0.0), seconds)

    def collecting(phase: str, info: dict) -> None:  # Python's cyclic GC, inside the lowering
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            events["gc"] = events.get("gc", 0.0) + time.perf_counter() - gc_start[0]

    shapes = [(t, full) for t, full in runner.warmup_shapes() if buckets is None or t in buckets]
    monitoring.register_event_duration_secs_listener(listen)
    gc.callbacks.append(collecting)
    rows = []
    try:
        for t_pad, full in shapes:
            events.clear()
            t0 = time.perf_counter()
            args, prompt_k = runner._inputs(runner._padding_batch(t_pad), full_sampler=full)
            t1 = time.perf_counter()
            lowered = runner._lower(args, prompt_k)
            t2 = time.perf_counter()
            rows.append({"sampler": "full" if full else "plain", "tokens": t_pad,
                         "inputs_s": t1 - t0, "lower_s": t2 - t1,
                         "trace_s": events.get(_TRACE, 0.0),
                         "to_mlir_s": events.get(_TO_MLIR, 0.0), "gc_s": events.get("gc", 0.0)})
            if compile:
                lowered.compile()
                rows[-1]["compile_s"] = time.perf_counter() - t2
            print(_row(rows[-1]), flush=True)
    finally:
        monitoring.unregister_event_duration_listener(listen)
        gc.callbacks.remove(collecting)
    return rows


def _row(r: dict) -> str:
    compile_s = f" {r['compile_s']:9.3f}" if "compile_s" in r else ""
    return (f"{r['sampler']:>6s} {r['tokens']:6d} {r['inputs_s']:9.3f} {r['lower_s']:8.3f} "
            f"{r['trace_s']:8.3f} {r['to_mlir_s']:8.3f} {r['gc_s']:6.3f}{compile_s}")


def profile_text(profiler: cProfile.Profile, top: int) -> str:
    """The top entries by cumulative and by own time."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="a preset of models/presets.py")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="the largest token bucket (8192: 11 buckets, issue 14's 22 shapes)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--platform", default=None,
                   help="lower for this platform instead of the local one: cuda lowers the Pallas "
                        "GPU attention kernel (Mosaic GPU) on a CPU-only machine, as on the H200")
    p.add_argument("--attention-impl", default=None,
                   help="default: pallas_gpu with --platform cuda, else reference")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hf-overrides", type=json.loads, default=None,
                   help="JSON of HF config keys over the preset's, e.g. "
                        "'{\"num_hidden_layers\": 2}'")
    p.add_argument("--buckets", type=int, nargs="+", default=None,
                   help="lower only these token buckets (default: all of the runner's)")
    p.add_argument("--pause-gc", action=argparse.BooleanOptionalAction, default=True,
                   help="pause Python's GC while lowering, as warm-up does (jaxserve.warmup)")
    p.add_argument("--compile", action="store_true",
                   help="also compile each shape here, serially (not with --platform)")
    p.add_argument("--profile", action="store_true", help="cProfile the lowering loop")
    p.add_argument("--profile-top", type=int, default=40)
    p.add_argument("--profile-out", default=None, help="also dump the pstats file here")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="results file name (default startup_trace_<model>)")
    args = p.parse_args(argv)
    if args.compile and args.platform:
        raise ValueError(f"--compile compiles for this machine, not --platform={args.platform}")

    impl = "pallas_gpu" if args.platform == "cuda" else "reference"
    t0 = time.perf_counter()
    runner = abstract_runner(args.model, max_num_seqs=args.max_num_seqs,
                             max_num_batched_tokens=args.max_num_batched_tokens,
                             max_model_len=args.max_model_len,
                             attention_impl=args.attention_impl or impl, dtype=args.dtype,
                             hf_overrides=args.hf_overrides)
    if args.platform:
        lower_for(runner, args.platform)
    build_s = time.perf_counter() - t0
    print(f"{args.model}: abstract runner in {build_s:.2f}s; attention {runner.attention_impl}, "
          f"lowering for {args.platform or jax.default_backend()}; buckets {runner.buckets}")
    print(f"{'sampler':>6s} {'tokens':>6s} {'inputs_s':>9s} {'lower_s':>8s} {'trace_s':>8s} "
          f"{'mlir_s':>8s} {'gc_s':>6s}" + (f" {'compile_s':>9s}" if args.compile else ""))
    profiler = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    with paused_gc() if args.pause_gc else contextlib.nullcontext():
        rows = time_lowering(runner, args.buckets, args.compile)
    if profiler is not None:
        profiler.disable()
    total_s = time.perf_counter() - t0
    lower = np.array([r["lower_s"] for r in rows])
    summary = {"shapes": len(rows), "total_s": total_s, "lower_sum_s": float(lower.sum()),
               "lower_mean_s": float(lower.mean()), "lower_first_s": float(lower[0]),
               "lower_median_s": float(np.median(lower)),
               "trace_sum_s": sum(r["trace_s"] for r in rows),
               "to_mlir_sum_s": sum(r["to_mlir_s"] for r in rows),
               "gc_sum_s": sum(r["gc_s"] for r in rows)}
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in summary.items()))
    result = {"benchmark": "startup_trace", "env": common.environment(),
              "config": {k: v for k, v in vars(args).items() if not k.startswith("profile")},
              "build_s": build_s, "summary": summary, "rows": rows}
    if profiler is not None:
        text = profile_text(profiler, args.profile_top)
        print(text)
        result["profile_top"] = text
        if args.profile_out:
            profiler.dump_stats(args.profile_out)
    if args.out:
        common.write_results(args.name or f"startup_trace_{common.model_tag(args.model)}", result,
                             args.out)


if __name__ == "__main__":
    main()
