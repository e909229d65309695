"""transformers `generate` on the same dummy architecture: the baseline for benchmarks.throughput.

Runs in its own process (its own CUDA memory). Prints one JSON line: output tokens/s over static
batches of --batch prompts (random token ids, ignore_eos via min_new_tokens = max_new_tokens).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.presets import get_preset

    hf = dict(get_preset(args.model))
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).eval()
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, cfg.vocab_size, size=(args.num_prompts, args.input_len))
    gen = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False,
               pad_token_id=0)
    with torch.no_grad():  # warm-up
        model.generate(torch.tensor(prompts[:args.batch], device="cuda"), **{**gen,
                       "max_new_tokens": 2, "min_new_tokens": 2})
    torch.cuda.synchronize()
    start = time.perf_counter()
    out_tokens = 0
    for i in range(0, args.num_prompts, args.batch):
        batch = torch.tensor(prompts[i:i + args.batch], device="cuda")
        with torch.no_grad():
            out = model.generate(batch, attention_mask=torch.ones_like(batch), **gen)
        out_tokens += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(json.dumps({"batch": args.batch, "num_prompts": args.num_prompts, "elapsed_s": elapsed,
                      "output_tokens_per_s": out_tokens / elapsed}))


if __name__ == "__main__":
    main()
