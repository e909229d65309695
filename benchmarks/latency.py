"""Latency, like `vllm bench latency`: time to first token and time per output token at small batches.

python -m benchmarks.latency --model llama-3-8b --load-format dummy --batch-sizes 1,4,16 \
    --input-len 128 --output-len 128
Prints each next to the roofline: a decode step cannot beat (weight bytes + KV bytes) / copy bandwidth.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import common


def measure(engine, batch: int, input_len: int, output_len: int, seed: int) -> dict:
    """Run one batch through LLMEngine.step(), timing the first token and the decode steps."""
    from jaxserve import SamplingParams

    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i in range(batch):
        prompt = rng.integers(0, engine.model_config.vocab_size, size=input_len).tolist()
        engine.add_request(f"lat-{seed}-{i}", prompt, params)
    first_token_s, step_times, done = None, [], 0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        if first_token_s is None and outs and all(o.outputs[0].token_ids for o in outs):
            first_token_s = now - start
        elif first_token_s is not None:
            step_times.append(now - t)
        done += sum(o.finished for o in outs)
    return {"batch": batch, "ttft_s": first_token_s, "tpot_s": float(np.median(step_times)),
            "tpot_mean_s": float(np.mean(step_times)), "e2e_s": time.perf_counter() - start}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model's)")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--quantization", default=None, help="fp8, awq or gptq (vLLM's)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="results file name (default latency_<model>)")
    args = p.parse_args(argv)
    common.log_engine_progress()
    from jaxserve import LLM

    batches = [int(b) for b in args.batch_sizes.split(",")]
    bw = common.measure_copy_bandwidth()  # before the engine takes the GPU's memory
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, tokenizer=args.tokenizer,
              max_model_len=args.input_len + args.output_len + 16, max_num_seqs=max(batches),
              max_num_batched_tokens=max(2048, args.input_len * max(batches)),
              attention_backend=args.attention_backend,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.llm_engine
    for b in batches:  # warm-up: compile every bucket the timed runs touch
        measure(engine, b, args.input_len, 4, seed=1000 + b)
    mc, itemsize = engine.model_config, 2 if args.dtype == "bfloat16" else 4
    # quantized runs: the floor of the bytes stored (fp8 / int4 weights, an fp8 KV cache)
    weight_ratio, kv_itemsize = common.stored_bytes(engine)
    rows = []
    for b in batches:
        r = measure(engine, b, args.input_len, args.output_len, seed=b)
        ctx = args.input_len + args.output_len / 2
        # MoE: the experts b tokens touch
        w_bytes = weight_ratio * 2 / itemsize * common.weight_bytes_read(mc, itemsize, b)
        r["tpot_floor_s"] = (w_bytes + b * ctx * common.kv_bytes_per_token(mc, kv_itemsize)) / bw
        rows.append(r)
        print(f"batch {b:4d}: TTFT {1e3 * r['ttft_s']:.1f} ms, TPOT {1e3 * r['tpot_s']:.2f} ms "
              f"(floor {1e3 * r['tpot_floor_s']:.2f} ms, {r['tpot_s'] / r['tpot_floor_s']:.2f}x)")
    result = {"args": vars(args), "env": common.environment(), "copy_bandwidth_Bps": bw,
              "rows": rows, "compiles": engine.runner.num_compiles,
              "weight_ratio": weight_ratio, "kv_itemsize": kv_itemsize}
    path = common.write_results(args.name or f"latency_{common.model_tag(args.model)}", result,
                                args.out)
    try:
        common.bar_plot(path.with_suffix(".png"), f"TPOT {args.model}",
                        [f"b{r['batch']}" for r in rows], [1e3 * r["tpot_s"] for r in rows],
                        "ms per output token")
    except ImportError:
        print("matplotlib missing: no PNG")


if __name__ == "__main__":
    main()
