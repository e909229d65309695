"""Greedy tokens of the Pallas attention backend against the XLA reference backend, end to end.

  python3 scripts/backend_check.py --model PATH_OR_PRESET [--load-format dummy] [--tokenizer DIR]

Each backend runs in its own process (its own GPU memory) over the same prompts: a few short chat
prompts, a random-token prompt and one long prompt (several prefill chunks), greedy, with the top-2
logprobs of every step. Exit status 0 when every sequence is identical; otherwise the first
divergence of each differing sequence is printed with the reference's top-2 logprob gap there:
a gap under --tie-gap is a near-tie, where bf16 rounding differences between two correct
attention implementations may pick either token (dummy weights make most steps near-ties).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROMPTS = ["The capital of France is", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime.", "你好，请介绍一下人工智能"]


def run_backend(args) -> dict:
    """Child process: generate with one backend, print one JSON line."""
    import numpy as np

    from jaxserve import LLM, SamplingParams

    llm = LLM(args.model, load_format=args.load_format, tokenizer=args.tokenizer,
              dtype=args.dtype, attention_backend=args.backend, max_num_seqs=16,
              max_num_batched_tokens=256, max_model_len=2048, gpu_memory_utilization=0.45,
              enable_prefix_caching=False, enforce_eager=True)
    tok = llm.get_tokenizer()
    vocab = min(tok.vocab_size, 32000)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": tok(p)["input_ids"]} for p in PROMPTS]
    prompts.append({"prompt_token_ids": rng.integers(100, vocab, 37).tolist()})
    long_text = " ".join(["The history of mathematics spans many civilizations."] * 70)
    prompts.append({"prompt_token_ids": tok(long_text)["input_ids"][:700]})
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=2,
                            ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    rows = []
    for o in outs:
        c = o.outputs[0]
        gaps = []
        for step in c.logprobs:
            lps = sorted((lp.logprob for lp in step.values()), reverse=True)
            gaps.append(lps[0] - lps[1] if len(lps) > 1 else float("inf"))
        rows.append(dict(prompt_len=len(o.prompt_token_ids), token_ids=c.token_ids, gaps=gaps))
    impl = llm.llm_engine.runner.attention_impl
    print("RESULT " + json.dumps(dict(backend=args.backend, impl=impl, rows=rows)), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tie-gap", type=float, default=0.02)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # set in the child
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.backend:
        run_backend(args)
        return 0
    results = {}
    for backend in ("reference", "pallas"):
        cmd = [sys.executable, __file__, "--backend", backend, "--load-format", args.load_format,
               "--dtype", args.dtype, "--max-tokens", str(args.max_tokens)]
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            raise SystemExit(f"{backend} run failed (exit {proc.returncode})")
        results[backend] = json.loads(lines[0][len("RESULT "):])
        print(f"{backend}: impl={results[backend]['impl']}", flush=True)
    ref, pal = results["reference"]["rows"], results["pallas"]["rows"]
    summary = dict(model=args.model or "SmolLM2-135M-Instruct (embedded GGUF)",
                   load_format=args.load_format, sequences=[])
    for i, (r, q) in enumerate(zip(ref, pal)):
        n = len(r["token_ids"])
        first = next((j for j in range(n) if r["token_ids"][j] != q["token_ids"][j]), None)
        entry = dict(prompt_len=r["prompt_len"], tokens=n, equal=first is None)
        if first is not None:
            gap = r["gaps"][first]
            entry.update(first_divergence=first, ref_top2_gap=gap, near_tie=gap < args.tie_gap,
                         equal_prefix=first)
        summary["sequences"].append(entry)
        print(f"seq {i} (prompt {r['prompt_len']} tokens): " + (
            f"all {n} tokens equal" if first is None else
            f"equal for {first} of {n} tokens; reference top-2 gap there {gap:.4f} "
            f"({'near-tie' if gap < args.tie_gap else 'NOT a near-tie'})"))
    summary["all_equal"] = all(s["equal"] for s in summary["sequences"])
    summary["only_near_ties"] = all(s["equal"] or s["near_tie"] for s in summary["sequences"])
    print(json.dumps({k: summary[k] for k in ("model", "all_equal", "only_near_ties")}))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if summary["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
