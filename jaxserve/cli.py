"""Command line: `jaxserve generate "prompt"` (offline) and `jaxserve serve [MODEL]` (OpenAI server).

Engine flags are derived from EngineConfig's fields (name, type, default, help, choices), so the
CLI, LLM(**kwargs) and the config never disagree; vLLM flags jaxserve lacks are refused by name.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing

from jaxserve.config import EngineConfig

# `vllm serve` flags with no EngineConfig field, refused with the reason (never silently ignored).
VLLM_FLAGS_NOT_IMPLEMENTED = {
    "--tool-parser-plugin": "only the built-in tool-call parsers (--tool-call-parser)",
    "--structured-outputs-config": "structured outputs are not implemented yet",
    "--guided-decoding-backend": "structured outputs are not implemented yet",
    "--limit-mm-per-prompt": "multimodal inputs are not supported",
    "--mm-processor-kwargs": "multimodal inputs are not supported",
    "--distributed-executor-backend": "one process drives all local devices (jax.sharding)",
    "--swap-space": "preempted sequences are recomputed, never swapped to the CPU",
    "--num-scheduler-steps": "multi-step scheduling is not implemented (async scheduling is on)",
    "--rope-scaling": "set it through --hf-overrides '{\"rope_scaling\": ...}'",
    "--tokenizer-mode": "only the fast (tokenizers) tokenizer is used",
    "--config-format": "config.json (HF) and GGUF metadata are read as they come",
}


def _flag_type(hint):
    """int | None -> int; bool stays bool (BooleanOptionalAction)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (`max_model_len` -> `--max-model-len`), vLLM's spelling."""
    hints = typing.get_type_hints(EngineConfig)
    for f in dataclasses.fields(EngineConfig):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        names = ["--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        kind = _flag_type(hints[f.name])
        kw = {"dest": f.name, "default": f.default, "help": meta["help"]}
        if kind is bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if meta.get("json"):
            kind = _json_object
        elif kind is tuple or typing.get_origin(kind) is tuple:
            kind = str
        p.add_argument(*names, type=kind, choices=meta.get("choices"), **kw)


def _json_object(text: str):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments from parsed flags (every field that has a flag)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if hasattr(args, f.name) and f.name != "model"}


def refuse_unknown(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """Exit (status 2) naming the first flag parse_known_args left over."""
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in VLLM_FLAGS_NOT_IMPLEMENTED:
            parser.error(f"{flag} is not supported by jaxserve: {VLLM_FLAGS_NOT_IMPLEMENTED[flag]}")
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")


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


def _merge_lora(args) -> int:
    from jaxserve.merge_lora import merge_lora

    merged = merge_lora(args.base, args.adapter, args.out)
    print(f"merged {len(merged)} weights of {args.adapter} into {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    gen.add_argument("prompt", nargs="*", help="prompts (default: two examples)")
    gen.add_argument("--model", default=None,
                     help="HF dir, hub repo id or .gguf file (default: the embedded SmolLM2)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen)
    merge = sub.add_parser("merge-lora", help="fold a PEFT LoRA adapter into its base checkpoint")
    merge.add_argument("base", help="the base model's HF directory (safetensors)")
    merge.add_argument("adapter", help="the PEFT adapter directory")
    merge.add_argument("out", help="the merged model's directory (must not exist)")
    merge.set_defaults(func=_merge_lora)
    try:
        from jaxserve.server.cli import add_serve_parser
    except ImportError:  # the server's extra dependencies are missing
        add_serve_parser = None
    if add_serve_parser is not None:
        add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    refuse_unknown(parser, extra)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        return args.func(args)
    except ValueError as e:  # a bad option or model: one line, not a traceback
        logging.getLogger("jaxserve").debug("start-up failed", exc_info=True)
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
