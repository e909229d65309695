"""LoRA throughput (issue 17): N requests spread round-robin over K random rank-R PEFT adapters on
every projection (q/k/v/o, gate/up/down), against the same run without LoRA. Each mode runs in
its own process (its own device memory); dummy weights, ignore_eos.

python -m benchmarks.lora --model llama-3-8b --num-prompts 256 --num-adapters 8 --rank 16
Prints both runs' output tok/s and lora / base (issue 17 asks >= 0.8).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common


def write_adapters(root: str, mc, num: int, rank: int, seed: int) -> list[str]:
    """num PEFT adapter directories for a model of config `mc` (random f16 A and B)."""
    from safetensors.numpy import save_file

    H, D, F = mc.head_dim, mc.hidden_size, mc.intermediate_size
    q, kv = mc.num_q_heads * H, mc.num_kv_heads // mc.kv_replication * H
    shapes = {"self_attn.q_proj": (D, q), "self_attn.k_proj": (D, kv),
              "self_attn.v_proj": (D, kv), "self_attn.o_proj": (q, D),
              "mlp.gate_proj": (D, F), "mlp.up_proj": (D, F), "mlp.down_proj": (F, D)}
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num):
        path = os.path.join(root, f"adapter{i}")
        os.makedirs(path)
        tensors = {}
        for layer in range(mc.num_layers):
            for module, (fan_in, fan_out) in shapes.items():
                name = f"base_model.model.model.layers.{layer}.{module}"
                tensors[f"{name}.lora_A.weight"] = (
                    0.01 * rng.standard_normal((rank, fan_in))).astype(np.float16)
                tensors[f"{name}.lora_B.weight"] = (
                    0.01 * rng.standard_normal((fan_out, rank))).astype(np.float16)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                       "target_modules": [m.split(".")[1] for m in shapes]}, f)
        paths.append(path)
    return paths


def run(args) -> dict:
    """One mode ("lora" or "base") in this process -> its measurements."""
    from jaxserve import LLM, LoRARequest, SamplingParams

    lora = args.mode == "lora"
    kw = dict(enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank) if lora \
        else {}
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              tokenizer=args.tokenizer,
              max_model_len=args.input_len + args.output_len + 16,
              max_num_batched_tokens=args.max_num_batched_tokens, **kw)
    load_s = time.perf_counter() - t0
    engine = llm.llm_engine
    loras = [None]
    if lora:
        root = tempfile.mkdtemp(prefix="lora_bench_")
        loras = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(
            write_adapters(root, engine.model_config, args.num_adapters, args.rank, args.seed))]
    rng = np.random.default_rng(args.seed)
    vocab = engine.model_config.vocab_size
    prompts = [rng.integers(0, vocab, size=args.input_len).tolist()
               for _ in range(args.num_prompts)]
    per_prompt = [loras[i % len(loras)] for i in range(args.num_prompts)]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len,
                            ignore_eos=True)
    t0 = time.perf_counter()  # warm-up: every adapter loaded into its slot, buckets compiled
    llm.generate(prompts[:len(loras) * 4], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False, lora_request=per_prompt[:len(loras) * 4])
    llm.reset_prefix_cache()
    warmup_s = time.perf_counter() - t0
    compiles = engine.runner.num_compiles
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True, lora_request=per_prompt)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"mode": args.mode, "elapsed_s": elapsed, "output_tokens_per_s": out_tokens / elapsed,
            "output_tokens": out_tokens, "load_s": load_s, "warmup_s": warmup_s,
            "compiles_during_timed_run": engine.runner.num_compiles - compiles,
            "num_kv_pages": engine.num_kv_pages}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["lora", "base"], default=None,
                   help="run one mode here (the driver runs both, each in a subprocess)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the embedded SmolLM2 one)")
    p.add_argument("--out", default="benchmarks/results")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.log_engine_progress()
    if args.mode is not None:
        print(json.dumps(run(args)))
        return
    results = {}
    for mode in ("base", "lora"):
        cmd = [sys.executable, "-m", "benchmarks.lora", *(argv or sys.argv[1:]), "--mode", mode]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:])
            raise SystemExit(f"{mode} run failed")
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]}")
    ratio = results["lora"]["output_tokens_per_s"] / results["base"]["output_tokens_per_s"]
    print(f"LoRA / base output tok/s: {ratio:.3f}")
    common.write_results("lora", {**results, "ratio": ratio, "args": vars(args),
                                  "environment": common.environment()}, args.out)


if __name__ == "__main__":
    main()
