"""The cost of structured outputs (issue 15): one engine, the same prompts run free and with a share
of them under a JSON schema, output tok/s side by side, and the host's grammar work per step.

python -m benchmarks.structured --model llama-3-8b --load-format dummy --num-prompts 256 \
    --tokenizer .gpu_assets/smollm2_tokenizer        # issue 15's run (H200)
python -m benchmarks.structured --smoke               # CPU check: a tiny random model

With dummy weights the text is random, so the schema bounds every string and number (the grammar
always finishes); free requests run to --output-len with ignore_eos, constrained ones until their
grammar completes or --output-len. Tokens/s counts the tokens each request produced.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}


def run(args) -> dict:
    from jaxserve import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, tokenizer=args.tokenizer,
              max_model_len=args.input_len + args.output_len + 16, max_num_seqs=args.num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, min(vocab, 30000), args.input_len).tolist()
               for _ in range(args.num_prompts)]
    fill = [0.0]
    token_inputs = engine._token_inputs

    def timed_token_inputs(batch):  # the host's mask work for a step (grammar fill included)
        start = time.perf_counter()
        try:
            return token_inputs(batch)
        finally:
            fill[0] += time.perf_counter() - start

    engine._token_inputs = timed_token_inputs
    constraint = StructuredOutputsParams(json=SCHEMA)
    rows = {}
    for name, share in [("free", 0.0), (f"{int(args.share * 100)}% JSON schema", args.share)]:
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.output_len,
                                 ignore_eos=True,
                                 structured_outputs=constraint if i < share * len(prompts) else None)
                  for i in range(len(prompts))]
        llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm (grammar compile, shapes)
        if share:  # the first constrained request started the deferred steps' compile: not timed
            waited = time.perf_counter()
            engine.runner.deferred_ready.wait()
            print(f"deferred steps compiled (waited {time.perf_counter() - waited:.1f} s)")
        llm.reset_prefix_cache()
        fill[0], steps = 0.0, engine.stats["steps"]
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        llm.reset_prefix_cache()
        steps = engine.stats["steps"] - steps
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        done = sum(o.outputs[0].finish_reason == "stop" for o in outs)
        rows[name] = {"output_tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
                      "output_tokens": tokens, "steps": steps, "grammars_finished": done,
                      "mask_ms_per_step": fill[0] * 1e3 / max(steps, 1)}
        print(f"{name:24s} {tokens / elapsed:9.0f} tok/s ({elapsed:.1f} s, {steps} steps, "
              f"host mask work {rows[name]['mask_ms_per_step']:.2f} ms/step, "
              f"{done} grammars finished)", flush=True)
    names = list(rows)
    ratio = rows[names[1]]["output_tokens_per_s"] / rows[names[0]]["output_tokens_per_s"]
    print(f"ratio constrained / free: {ratio:.2f} (bar: >= 0.90)")
    return {"rows": rows, "ratio": ratio}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--share", type=float, default=0.5, help="share of constrained requests")
    p.add_argument("--smoke", action="store_true", help="a tiny random model (CPU)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    common.log_engine_progress()
    if args.smoke:
        from tests.engine.tiny import build_tiny_llama

        args.model = str(build_tiny_llama(Path(tempfile.mkdtemp()) / "tiny"))
        args.load_format, args.dtype = "auto", "float32"
        args.num_prompts, args.num_seqs, args.input_len, args.output_len = 8, 8, 8, 64
        args.max_num_batched_tokens = 64
    result = {"args": vars(args), "env": common.environment(), **run(args)}
    name = f"structured_{common.model_tag(args.model)}" + ("_smoke" if args.smoke else "")
    path = common.write_results(name, result, args.out)
    try:
        common.bar_plot(path.with_suffix(".png"), name, list(result["rows"]),
                        [r["output_tokens_per_s"] for r in result["rows"].values()],
                        "output tokens/s")
    except ImportError:
        print("matplotlib missing: no PNG")


if __name__ == "__main__":
    main()
