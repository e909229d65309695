"""LLM: the offline API (vLLM's `LLM`): generate() and chat() over an LLMEngine."""
from __future__ import annotations

import dataclasses
import itertools

from tqdm.auto import tqdm

from jaxserve.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
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

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults (vLLM's method)."""
        return self.llm_engine.input_processor.default_params()

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        """prompts: a str, a list of str, a list of token ids, a list of token-id lists, or dicts
        with "prompt" / "prompt_token_ids". Outputs come back in the order of the prompts.
        lora_request: a LoRARequest for every prompt, or a list of one (or None) per prompt."""
        prompts = self.llm_engine.input_processor.prompt_list(prompts)
        params = sampling_params if sampling_params is not None else \
            self.get_default_sampling_params()
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        # Offline callers see only finished outputs: skip the per-step text work (vLLM does too).
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        if isinstance(lora_request, list):
            if len(lora_request) != len(prompts):
                raise ValueError(f"got {len(lora_request)} lora requests for {len(prompts)} "
                                 f"prompts")
            loras = lora_request
        else:
            loras = [lora_request] * len(prompts)
        return self._run(prompts, params, use_tqdm, loras)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: one BeamSearchOutput (best beams first) per prompt."""
        ids = (f"beam-{next(self._counter)}" for _ in itertools.count())
        return beam_search(self.llm_engine, prompts, params, ids, use_tqdm, concurrency_limit)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             documents: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             lora_request=None) -> list[RequestOutput]:
        """messages: one conversation (list of {"role", "content"}) or a list of them; content is a
        string or a list of {"type": "text", "text": ...} parts (vLLM's LLM.chat arguments)."""
        if not messages:
            raise ValueError("messages is empty")
        single = isinstance(messages[0], dict) or hasattr(messages[0], "model_dump")
        conversations = [messages] if single else list(messages)
        prompts = [self.apply_chat_template(
            c, chat_template, add_generation_prompt, continue_final_message=continue_final_message,
            tools=tools, documents=documents, chat_template_kwargs=chat_template_kwargs)
            for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def apply_chat_template(self, conversation, chat_template: str | None = None,
                            add_generation_prompt: bool = True, **render_kwargs) -> dict:
        """One conversation -> {"prompt": text, "prompt_token_ids": ids}, as the server renders it."""
        p = self.llm_engine.input_processor.chat_prompt(
            conversation, chat_template=chat_template, add_generation_prompt=add_generation_prompt,
            **render_kwargs)
        return {"prompt": p.text, "prompt_token_ids": p.token_ids}

    def _run(self, prompts, params, use_tqdm, loras=None) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras or [None] * len(prompts)):
                rid = f"gen-{next(self._counter)}"
                engine.add_request(rid, prompt, p, lora_request=lora)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # a bad prompt fails the call and leaves nothing queued
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm,
                   dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
                if use_tqdm:
                    new = engine.stats["generation_tokens"]
                    elapsed = bar.format_dict["elapsed"] or 1e-9
                    bar.set_postfix_str(f"output {new / elapsed:.0f} tok/s", refresh=False)
        except BaseException:  # a failed (or interrupted) call leaves nothing queued behind it
            engine.abort_request([rid for rid in ids if rid not in results])
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]

