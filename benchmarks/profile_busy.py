"""How busy the device is during generation: a jax.profiler trace of a decode-heavy run, reduced to
the fraction of wall time in which any GPU kernel runs (union of kernel intervals / trace span).

python -m benchmarks.profile_busy --model llama-3-8b --load-format dummy --num-prompts 256 \
    --input-len 128 --output-len 128
Writes the Perfetto trace and a JSON summary (busy fraction, top kernels by time) to --out.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from benchmarks import common


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    from jaxserve import LLM, SamplingParams

    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, tokenizer=args.tokenizer,
              max_model_len=args.input_len + args.output_len + 16, max_num_seqs=args.num_prompts,
              max_num_batched_tokens=args.max_num_batched_tokens)
    rng = np.random.default_rng(0)
    vocab = llm.llm_engine.model_config.vocab_size
    prompts = [rng.integers(0, vocab, size=args.input_len).tolist() for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True)
    other = [rng.integers(0, vocab, size=args.input_len).tolist() for _ in prompts]
    llm.generate(other, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # compile outside the trace; other prompts: no prefix-cache hits
    summary, wall = common.trace_device(lambda: llm.generate(prompts, params, use_tqdm=False),
                                        os.path.join(args.out, "profile_trace"))
    summary.update(wall_s=wall, env=common.environment(), args=vars(args),
                   output_tok_s=args.num_prompts * args.output_len / wall,
                   busy_of_wall=(summary.get("busy_ms") or 0) / 1e3 / wall)
    print(json.dumps({k: v for k, v in summary.items() if k != "env"}, indent=1, default=str))
    common.write_results(f"profile_busy_{common.model_tag(args.model)}", summary, args.out)


if __name__ == "__main__":
    main()
