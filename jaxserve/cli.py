"""Command line: `jaxserve generate "prompt"` (offline) and `jaxserve serve [MODEL]` (OpenAI server)."""
from __future__ import annotations

import argparse
import logging
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """EngineConfig flags, spelled like `vllm serve`'s."""
    p.add_argument("--tokenizer", default=None, help="tokenizer dir or .gguf (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=16)
    p.add_argument("--num-kv-pages", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    p.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "pallas"])
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")


def engine_kwargs(args: argparse.Namespace) -> dict:
    keys = ("tokenizer", "dtype", "max_model_len", "tensor_parallel_size", "gpu_memory_utilization",
            "max_num_seqs", "max_num_batched_tokens", "page_size", "num_kv_pages", "seed",
            "load_format", "attention_backend", "enable_prefix_caching")
    return {k: getattr(args, k) for k in keys}


def _generate(args) -> int:
    from jaxserve import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.sampling_seed)
    prompts = args.prompt or ["The capital of France is", "你好，请介绍一下人工智能"]
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        print(f"\n### {prompt}\n{out.outputs[0].text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    gen.add_argument("prompt", nargs="*", help="prompts (default: two examples)")
    gen.add_argument("--model", default=None, help="HF dir, .gguf file or preset (default: SmolLM2)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen)
    try:
        from jaxserve.server.cli import add_serve_parser
    except ImportError:
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "generate":
        return _generate(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
