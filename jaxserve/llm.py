"""LLM: the offline API (vLLM's `LLM`): generate() and chat() over an LLMEngine."""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as SequenceABC

from tqdm.auto import tqdm

from jaxserve.config import EngineConfig
from jaxserve.engine import LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """`LLM(model=None, **engine_config)`: keyword arguments are exactly EngineConfig's fields."""

    def __init__(self, model: str | None = None, **kwargs):
        names = {f for f in EngineConfig.__dataclass_fields__}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown LLM arguments {unknown}; accepted: {sorted(names)}")
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a str, a list of str, a list of token ids, a list of token-id lists, or dicts
        with "prompt" / "prompt_token_ids". Outputs come back in the order of the prompts."""
        prompts = _as_prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        # Offline callers see only finished outputs: skip the per-step text work (vLLM does too).
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        return self._run(prompts, params, use_tqdm)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True
             ) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of conversations."""
        if not messages:
            raise ValueError("messages is empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, chat_template, add_generation_prompt)
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation, chat_template: str | None = None,
                            add_generation_prompt: bool = True) -> dict:
        tok = self.llm_engine.tokenizer
        template = chat_template or self.llm_engine.chat_template
        if template is None:
            raise ValueError("the model has no chat template; pass chat_template=")
        text = tok.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
        return {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)}

    def _run(self, prompts, params, use_tqdm) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"gen-{next(self._counter)}"
                engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # a bad prompt fails the call and leaves nothing queued
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm,
                   dynamic_ncols=True)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
            if use_tqdm:
                new = engine.stats["generation_tokens"]
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix_str(f"output {new / elapsed:.0f} tok/s", refresh=False)
        bar.close()
        return [results[rid] for rid in ids]


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, SequenceABC) and prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    if not isinstance(prompts, SequenceABC) or not prompts:
        raise ValueError(f"prompts must be a non-empty str or list, got {prompts!r:.80}")
    return list(prompts)
