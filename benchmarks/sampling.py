"""Sampling settings at greedy speed (issue 13): one engine, each row of SamplingParams timed on the
same prompts, printed as output tok/s and the ratio to greedy.

python -m benchmarks.sampling --model qwen2-7b --load-format dummy --num-seqs 512
python -m benchmarks.sampling --model qwen2-7b --load-format dummy --num-seqs 1024 --num-prompts 1024
python -m benchmarks.sampling --micro --vocab 152064 --batches 512,1024   # sample() alone, device us
python -m benchmarks.sampling --smoke [--micro]   # CPU check: a tiny random model, short settings
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

T = dict(temperature=0.7)
ROWS: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "T0.7": T,
    "T0.7 top_k 50": dict(T, top_k=50),
    "T0.7 top_p 0.9": dict(T, top_p=0.9),
    "Qwen defaults (T0.7 top_p 0.8 top_k 20 rep 1.05)": dict(T, top_p=0.8, top_k=20,
                                                             repetition_penalty=1.05),
    "greedy rep 1.1": dict(temperature=0.0, repetition_penalty=1.1),
    "greedy presence 0.5 frequency 0.5": dict(temperature=0.0, presence_penalty=0.5,
                                              frequency_penalty=0.5),
    "T0.7 min_p 0.1": dict(T, min_p=0.1),
    "greedy logprobs 5": dict(temperature=0.0, logprobs=5),
    "greedy logprobs 20": dict(temperature=0.0, logprobs=20),
    "T0.7 seed per request": dict(T, seed=-1),  # -1: the request's index
    "T0.7 n=4 (1/4 of the prompts)": dict(T, n=4),
}


def _params(settings: dict, index: int, max_tokens: int):
    from jaxserve import SamplingParams

    kw = dict(settings)
    if kw.get("seed") == -1:
        kw["seed"] = index
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def run_engine(args) -> dict:
    from jaxserve import LLM

    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, tokenizer=args.tokenizer,
              max_model_len=args.input_len + args.output_len + 16, max_num_seqs=args.num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size)
    engine = llm.llm_engine
    rng = np.random.default_rng(args.seed)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(0, vocab, args.input_len).tolist() for _ in range(args.num_prompts)]
    rows = {}
    for name in args.rows:
        settings = ROWS[name]
        batch = prompts[:max(1, len(prompts) // settings.get("n", 1))]
        warm = min(len(batch), args.num_seqs)  # compiles this row's step variants
        llm.generate(batch[:warm], [_params(settings, i, 4) for i in range(warm)], use_tqdm=False)
        llm.reset_prefix_cache()
        compiles = engine.runner.num_compiles
        params = [_params(settings, i, args.output_len) for i in range(len(batch))]
        steps, timers = engine.stats["steps"], _host_timers(engine)
        timers.update(dict.fromkeys(timers, 0.0))
        result = {}

        def timed():
            start = time.perf_counter()
            result["outs"] = llm.generate(batch, params, use_tqdm=False)
            result["elapsed"] = time.perf_counter() - start

        profile = args.profile or args.profile_host
        trace = (common.trace_device(timed, host_level=2 if args.profile_host else 0)[0]
                 if profile else None)
        if not profile:
            timed()
        outs, elapsed = result["outs"], result["elapsed"]
        llm.reset_prefix_cache()
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        steps = engine.stats["steps"] - steps
        rows[name] = {"output_tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
                      "output_tokens": tokens, "settings": settings, "steps": steps,
                      "ms_per_step": elapsed * 1e3 / steps,
                      "host_ms_per_step": {k: v * 1e3 / steps for k, v in timers.items()},
                      "compiles_during_timed_run": engine.runner.num_compiles - compiles}
        print(f"{name:52s} {tokens / elapsed:10.0f} tok/s  ({elapsed:.1f} s, {steps} steps, "
              f"{rows[name]['ms_per_step']:.1f} ms/step; host ms/step: " + ", ".join(
                  f"{k} {v:.1f}" for k, v in rows[name]["host_ms_per_step"].items()) + ")",
              flush=True)
        if trace is not None:
            rows[name]["device_trace"] = trace
            busy = (trace.get("busy_ms") or 0.0) / steps
            print(f"    device busy {busy:.1f} ms/step ({trace.get('busy_fraction')})"
                  "; top ops (ms/step): " + ", ".join(
                      f"{op[:60]} {ms / steps:.2f}" for op, ms in trace.get("top_ops_ms", [])[:12]),
                  flush=True)
            if args.profile_host:
                print("    host events (ms/step, inclusive): " + ", ".join(
                    f"{op[:60]} {ms / steps:.2f}" for op, ms in trace.get("top_host_ms", [])[:20]),
                    flush=True)
    return rows


def _host_timers(engine) -> dict[str, float]:
    """Seconds spent in each host phase of LLMEngine.step (accumulating; the caller zeroes them).
    `fetch` is the host waiting for the device: ~0 when the host is the bottleneck. dispatch
    includes _inputs (host arrays), which includes metadata and penalty_inputs (runner.sampling)."""
    if hasattr(engine, "_bench_timers"):
        return engine._bench_timers
    timers = engine._bench_timers = {}
    targets = [(engine.scheduler, "schedule"), (engine.runner, "dispatch"),
               (engine.runner, "fetch"), (engine.scheduler, "update"),
               (engine.runner, "_inputs"), (engine.runner.sampling, "metadata"),
               (engine.runner.sampling, "penalty_inputs"), (engine.runner, "_key"),
               (engine.output_processor, "record_logprobs"), (engine, "_process_outputs")]
    for obj, name in targets:
        timers[name] = 0.0
        method = getattr(obj, name)

        def timed(*a, _method=method, _name=name, **kw):
            start = time.perf_counter()
            try:
                return _method(*a, **kw)
            finally:
                timers[_name] += time.perf_counter() - start

        setattr(obj, name, timed)
    return timers


def run_micro(args) -> dict:
    """Device time of sample() alone on random f32[B, V] logits, per setting and batch size."""
    import jax
    import jax.numpy as jnp

    from jaxserve.sampler import SamplingMetadata, sample

    fn = jax.jit(sample)
    rows = {}
    for B in args.batches:
        logits = jax.random.normal(jax.random.key(0), (B, args.vocab), jnp.float32) * args.scale
        for name in args.rows:
            s = dict(ROWS[name])
            n_lp = s.pop("logprobs", None)
            rand = s.get("temperature", 1.0) > 0
            L = 2 * args.micro_history if any(k.endswith("penalty") for k in s) else 0
            hist = np.random.default_rng(1).integers(0, args.vocab, (B, L)).astype(np.int32)
            md = SamplingMetadata(
                temperature=np.full(B, s.get("temperature", 1.0), np.float32),
                top_k=np.full(B, s.get("top_k", 0), np.int32),
                top_p=np.full(B, s.get("top_p", 1.0), np.float32),
                min_p=np.full(B, s.get("min_p", 0.0), np.float32),
                seeds=np.arange(B, dtype=np.uint32), counters=np.full(B, 7, np.int32),
                presence_penalty=np.full(B, s.get("presence_penalty", 0.0), np.float32),
                frequency_penalty=np.full(B, s.get("frequency_penalty", 0.0), np.float32),
                repetition_penalty=np.full(B, s.get("repetition_penalty", 1.0), np.float32),
                token_mask=np.zeros((B, 0), np.int32), bias_ids=np.zeros((B, 0), np.int32),
                bias_values=np.zeros((B, 0), np.float32), history_ids=hist,
                want_logprobs=np.full(B, n_lp is not None),
                prompt_lens=np.full(B, L // 2, np.int32), use_penalties=L > 0,
                use_top_k=rand and "top_k" in s, use_top_p=rand and "top_p" in s,
                use_min_p=rand and "min_p" in s, num_logprobs=-1 if n_lp is None else n_lp)
            if args.micro_engine_variant and name != "greedy":
                md.history_ids = np.random.default_rng(1).integers(
                    0, args.vocab, (B, 2 * args.micro_history)).astype(np.int32)
                md.prompt_lens = np.full(B, args.micro_history, np.int32)
                md.use_penalties = md.use_top_k = md.use_top_p = md.use_min_p = True
                md.num_logprobs = 20
            sets = [(logits, md)]
            try:
                us, wall = common.device_us(fn, sets, calls=args.micro_calls)
            except RuntimeError:  # the CPU backend records no device activity: wall time
                jax.block_until_ready(fn(*sets[0]))
                start = time.perf_counter()
                for _ in range(args.micro_calls):
                    out = fn(*sets[0])
                jax.block_until_ready(out)
                us = wall = (time.perf_counter() - start) * 1e6 / args.micro_calls
            rows[f"B={B} {name}"] = {"device_us": us, "wall_us": wall}
            print(f"B={B:5d} {name:52s} {us:9.0f} us", flush=True)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2-7b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--num-seqs", type=int, default=512, help="max_num_seqs")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (see ROWS)")
    p.add_argument("--micro", action="store_true", help="time sample() alone")
    p.add_argument("--profile-host", action="store_true",
                   help="--profile plus XLA's host events (where a launch spends its time; the "
                        "host tracer slows the host, so not for timing)")
    p.add_argument("--profile", action="store_true",
                   help="engine rows under the JAX profiler: device busy time and top ops per step")
    p.add_argument("--micro-engine-variant", action="store_true",
                   help="--micro: every non-greedy row with the runner's full variant flags "
                        "(penalties, top-k/p, min-p, max_logprobs logprobs), as the engine runs it")
    p.add_argument("--vocab", type=int, default=152064, help="--micro: V")
    p.add_argument("--batches", default="512,1024", help="--micro: batch sizes")
    p.add_argument("--scale", type=float, default=0.05,
                   help="--micro: logits std (small = flat, like dummy weights)")
    p.add_argument("--micro-history", type=int, default=150, help="--micro: prompt/output tokens")
    p.add_argument("--micro-calls", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="a tiny random model, short settings (CPU)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r] if "," in args.rows or args.rows in ROWS \
        else args.rows.split(",")
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def _smoke(args) -> None:
    """Tiny shapes for a CPU check of the whole script."""
    args.num_prompts, args.input_len, args.output_len, args.num_seqs = 8, 16, 8, 8
    args.dtype, args.max_num_batched_tokens, args.page_size = "float32", 64, 4
    args.vocab, args.batches, args.micro_calls, args.micro_history = 4096, [8], 3, 8
    if not args.micro:
        from tests.engine.tiny import build_tiny_llama

        args.model = str(build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny"))
        args.load_format = "auto"


def main(argv=None):
    args = parse_args(argv)
    common.log_engine_progress()
    if args.smoke:
        _smoke(args)
    rows = run_micro(args) if args.micro else run_engine(args)
    result = {"args": vars(args), "env": common.environment(), "rows": rows}
    key = "device_us" if args.micro else "output_tokens_per_s"
    if not args.micro and "greedy" in rows:
        base = rows["greedy"][key]
        print("\nratio to greedy:")
        for name, row in rows.items():
            row["ratio_to_greedy"] = row[key] / base
            print(f"  {name:52s} {row['ratio_to_greedy']:.2f}")
    tag = "micro" if args.micro else f"{common.model_tag(args.model)}_{args.num_seqs}seqs"
    name = args.name or f"sampling_{tag}" + ("_smoke" if args.smoke else "")
    path = common.write_results(name, result, args.out)
    try:
        common.bar_plot(path.with_suffix(".png"), name, [n[:24] for n in rows],
                        [r[key] for r in rows.values()],
                        "sample() device us" if args.micro else "output tokens/s")
    except ImportError:
        print("matplotlib missing: no PNG")


if __name__ == "__main__":
    main()
