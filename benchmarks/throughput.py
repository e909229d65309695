"""Offline throughput, like `vllm bench throughput`: N random (or ShareGPT) prompts, ignore_eos.

python -m benchmarks.throughput --model llama-3-8b --load-format dummy --num-prompts 1000 \
    --input-len 512 --output-len 256 [--baseline hf]
Prints requests/s, output and total tokens/s, the workload's roofline, and (with --baseline hf) the
ratio to transformers `generate` on the same prompts and dummy weights, at batch 1 and a large batch.
The engine's batch limits are a newcomer's (the device's defaults) unless --max-num-seqs /
--max-num-batched-tokens are given. Mixed lengths (issue 14's workload):
    --length-dist lognormal --input-len 280 --output-len 190 --temperature 0.8 --top-p 0.95
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time

import numpy as np

from benchmarks import common


LOGNORMAL_MAX_FACTOR = 8  # lognormal lengths are clipped to [4, 8 x their mean]


def make_dataset(args, vocab_size: int, tokenizer=None) -> list[tuple[list[int], int]]:
    """(prompt ids, output len) pairs: seeded random token ids, or a ShareGPT-format JSON file."""
    rng = np.random.default_rng(args.seed)
    if args.dataset:
        rows = json.loads(open(args.dataset).read())
        pairs = []
        for row in rows:
            turns = row.get("conversations", [])
            if len(turns) < 2:
                continue
            prompt = tokenizer.encode(turns[0]["value"])
            out_len = len(tokenizer.encode(turns[1]["value"]))
            if 4 <= len(prompt) <= 1024 and 4 <= out_len <= 1024:
                pairs.append((prompt, args.output_len or out_len))
            if len(pairs) == args.num_prompts:
                break
        return pairs

    def length(base):
        if args.length_dist == "lognormal":  # mean `base`: exp(mu + sigma^2 / 2) = base
            sigma = args.lognormal_sigma
            mu = np.log(base) - sigma**2 / 2
            return int(np.clip(round(rng.lognormal(mu, sigma)), 4, LOGNORMAL_MAX_FACTOR * base))
        lo, hi = int(base * (1 - args.range_ratio)), int(base * (1 + args.range_ratio))
        return int(rng.integers(max(1, lo), hi + 1))

    return [(rng.integers(0, vocab_size, size=length(args.input_len)).tolist(),
             length(args.output_len)) for _ in range(args.num_prompts)]


def run_jaxserve(args) -> dict:
    from jaxserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, tokenizer=args.tokenizer,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              attention_backend=args.attention_backend, page_size=args.page_size,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    load_s = time.perf_counter() - t0
    engine = llm.llm_engine
    data = make_dataset(args, engine.model_config.vocab_size, engine.tokenizer)
    params = [SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=o,
                             ignore_eos=True) for _, o in data]
    prompts = [p for p, _ in data]
    max_num_seqs = engine.config.max_num_seqs  # the device's default when not given
    warm = min(len(prompts), max_num_seqs)  # compiles the buckets the timed run will use
    t0 = time.perf_counter()
    llm.generate(prompts[:warm], [SamplingParams(temperature=args.temperature, max_tokens=4,
                                                 ignore_eos=True)] * warm, use_tqdm=False)
    llm.reset_prefix_cache()  # else the timed run finds these prompts' pages cached
    warmup_s = time.perf_counter() - t0
    compiles_before = engine.runner.num_compiles
    steps_before = engine.stats["steps"]
    timed = {}

    def run():
        t0 = time.perf_counter()
        timed["outs"] = llm.generate(prompts, params, use_tqdm=True)
        timed["elapsed"] = time.perf_counter() - t0

    trace = common.trace_device(run)[0] if args.profile else None
    if trace is None:
        run()
    outs, elapsed = timed["outs"], timed["elapsed"]
    steps = engine.stats["steps"] - steps_before
    if trace is not None:  # where the device time of the run went (prefill vs decode kernels)
        busy = (trace.get("busy_ms") or 0.0) / max(steps, 1)
        print(f"device busy {busy:.1f} ms/step over {steps} steps ({trace.get('busy_fraction')}); "
              "top ops (ms/step): " + ", ".join(f"{op[:60]} {ms / max(steps, 1):.2f}"
                                               for op, ms in trace.get("top_ops_ms", [])[:15]))
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    return {"elapsed_s": elapsed, "requests_per_s": len(prompts) / elapsed,
            "output_tokens_per_s": out_tokens / elapsed,
            "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
            "output_tokens": out_tokens, "input_tokens": in_tokens, "load_s": load_s,
            "warmup_s": warmup_s, "compiles_total": engine.runner.num_compiles,
            "compiles_during_timed_run": engine.runner.num_compiles - compiles_before,
            "compile_s": engine.runner.compile_seconds, "num_kv_pages": engine.num_kv_pages,
            "attention_impl": engine.runner.attention_impl,
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": engine.config.max_num_batched_tokens, "steps": steps,
            "device_trace": trace,
            "mean_input_len": in_tokens / len(prompts),
            "mean_output_len": out_tokens / len(prompts), "model_config": engine.model_config,
            "lengths": [(len(p), len(o.outputs[0].token_ids)) for p, o in zip(prompts, outs)],
            "stored": dict(zip(("weight_ratio", "kv_itemsize"), common.stored_bytes(engine)))}


def run_hf_baseline(args, batch: int, num_prompts: int) -> dict:
    """transformers generate in a subprocess (its own CUDA memory), static batches."""
    cmd = [sys.executable, "-m", "benchmarks.hf_baseline", "--model", args.model,
           "--batch", str(batch), "--num-prompts", str(num_prompts), "--input-len",
           str(args.input_len), "--output-len", str(args.output_len), "--seed", str(args.seed)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:])
        return {"error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--length-dist", choices=["uniform", "lognormal"], default="uniform",
                   help="uniform: len x (1 +- range-ratio); lognormal: mean len, --lognormal-sigma")
    p.add_argument("--lognormal-sigma", type=float, default=0.8)
    p.add_argument("--dataset", default=None, help="ShareGPT-format JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the device's")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the device's")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--quantization", default=None, help="fp8, awq or gptq (vLLM's)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    p.add_argument("--profile", action="store_true",
                   help="the timed run under the JAX profiler: device busy and top ops per step")
    p.add_argument("--baseline", choices=["hf"], default=None)
    p.add_argument("--hf-batches", default="1,64", help="batch sizes for the transformers baseline")
    p.add_argument("--hf-num-prompts", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.log_engine_progress()
    if args.max_model_len is None:
        spread = (LOGNORMAL_MAX_FACTOR if args.length_dist == "lognormal"
                  else 1 + args.range_ratio)
        args.max_model_len = int((args.input_len + args.output_len) * spread) + 16
    baseline = {}
    if args.baseline == "hf":
        for b in [int(x) for x in args.hf_batches.split(",")]:
            n = b if b == 1 else max(b, args.hf_num_prompts)
            baseline[f"hf_batch{b}"] = run_hf_baseline(args, b, n)
            print(f"transformers batch {b}: {baseline[f'hf_batch{b}']}")
    res = run_jaxserve(args)
    mc = res.pop("model_config")
    print(f"jaxserve: {res['output_tokens_per_s']:.0f} output tok/s (floor next)")
    import jax

    gc.collect()  # frees the engine's weights and KV pool: the probes below need ~8 GiB

    if jax.devices()[0].platform == "cpu":  # a CPU check of the script: small probes
        bw, rate = common.measure_copy_bandwidth(64 << 20), common.measure_matmul_rate(512)
    else:
        bw, rate = common.measure_copy_bandwidth(), common.measure_matmul_rate()
    # The floor of these requests' own lengths (mixed lengths keep their long tail).
    floor = common.requests_floor(mc, 2 if args.dtype == "bfloat16" else 4, res.pop("lengths"),
                                  batch=res["max_num_seqs"], bandwidth=bw, flops=rate,
                                  **res["stored"])
    result = {"args": vars(args), "env": common.environment(), "jaxserve": res, "floor": floor,
              "copy_bandwidth_Bps": bw, "matmul_flops": rate, "baseline": baseline}
    frac = res["output_tokens_per_s"] / floor["output_tokens_per_s"]
    print(f"\njaxserve: {res['requests_per_s']:.2f} req/s, {res['output_tokens_per_s']:.0f} output "
          f"tok/s, {res['total_tokens_per_s']:.0f} total tok/s ({res['elapsed_s']:.1f} s)")
    print(f"roofline: {floor['output_tokens_per_s']:.0f} output tok/s (copy {bw / 1e12:.2f} TB/s, "
          f"matmul {rate / 1e12:.0f} TFLOP/s) -> {100 * frac:.0f}% of the floor's rate")
    print(f"serial floor (attention after the matmuls, not overlapped): "
          f"{floor['serial_output_tokens_per_s']:.0f} output tok/s -> "
          f"{100 * res['output_tokens_per_s'] / floor['serial_output_tokens_per_s']:.0f}%")
    print(f"start-up: load {res['load_s']:.1f} s, warm-up {res['warmup_s']:.1f} s, "
          f"{res['compiles_total']} compiles ({res['compiles_during_timed_run']} in the timed run)")
    labels, values = ["jaxserve"], [res["output_tokens_per_s"]]
    for name, b in baseline.items():
        if "output_tokens_per_s" in b:
            ratio = res["output_tokens_per_s"] / b["output_tokens_per_s"]
            print(f"vs transformers {name}: {b['output_tokens_per_s']:.0f} tok/s -> {ratio:.1f}x")
            labels.append(name)
            values.append(b["output_tokens_per_s"])
    name = args.name or f"throughput_{common.model_tag(args.model)}_{args.input_len}_{args.output_len}"
    path = common.write_results(name, result, args.out)
    try:
        common.bar_plot(path.with_suffix(".png"), name, labels, values, "output tokens/s",
                        floor["output_tokens_per_s"])
    except ImportError:
        print("matplotlib missing: run `python -m benchmarks.plot` on the JSON later")


if __name__ == "__main__":
    main()
