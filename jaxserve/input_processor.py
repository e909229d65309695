"""InputProcessor: prompts, chat conversations and SamplingParams -> validated engine inputs.

The one intake path of LLM and the OpenAI server (vLLM V1's InputProcessor): prompt forms, chat
templating, tokenization, range checks and admission against the KV pool. Whatever can be wrong
with a request is found here and raised as InvalidRequest (a ValueError naming the field), before
anything reaches the engine loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

from jaxserve.sampling_params import SamplingParams

# apply_chat_template's own parameters: chat_template_kwargs may not set them.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")


class InvalidRequest(ValueError):
    """A caller mistake in one request; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ProcessedPrompt:
    text: str | None  # the prompt as text (None for token-id prompts offline)
    token_ids: list[int]  # validated: every id in [0, vocab_size)


@dataclass(frozen=True, kw_only=True)
class InputLimits:
    """What the engine can hold; fixed at start-up."""

    vocab_size: int  # V of the model (token ids must be below it)
    max_model_len: int  # prompt + output tokens of one sequence
    page_size: int
    num_kv_pages: int
    max_logprobs: int


class InputProcessor:
    """Shared by LLM and the server; holds the tokenizer, the default chat template and limits."""

    def __init__(self, tokenizer, chat_template: str | None, limits: InputLimits,
                 defaults: dict | None = None, template_timeout: float = 10.0):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.limits = limits
        # SamplingParams fields a request that does not set them gets (the model's
        # generation_config.json under --generation-config auto, as in vLLM).
        self.defaults = dict(defaults or {})
        self.template_timeout = template_timeout  # seconds, for templates sent with a request

    def default_params(self) -> SamplingParams:
        """vLLM's LLM.get_default_sampling_params()."""
        return SamplingParams(**self.defaults)

    # ---- prompts -------------------------------------------------------------------------------
    @staticmethod
    def prompt_list(prompts, param: str = "prompt") -> list:
        """One prompt or a batch -> a list: str, token-id list, or {"prompt" | "prompt_token_ids"}."""
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, SequenceABC) and prompts and _is_int(prompts[0]):
            return [list(prompts)]
        if not isinstance(prompts, SequenceABC) or not prompts:
            raise InvalidRequest(f"{param} must be a non-empty string or list, got "
                                 f"{_short(prompts)}", param)
        return list(prompts)

    def process_prompt(self, prompt, param: str = "prompt",
                       add_special_tokens: bool = True) -> ProcessedPrompt:
        """A str, a token-id list or a dict -> validated token ids (and text when known)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = self.check_token_ids(prompt["prompt_token_ids"], param)
                text = prompt.get("prompt")
                return ProcessedPrompt(None if text is None else self.check_text(text, param), ids)
            if "prompt" in prompt:
                return self.process_prompt(prompt["prompt"], param, add_special_tokens)
            raise InvalidRequest(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys "
                                 f"{sorted(map(str, prompt))}", param)
        if isinstance(prompt, str):
            text = self.check_text(prompt, param)
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            return ProcessedPrompt(text, ids)
        if isinstance(prompt, SequenceABC) or hasattr(prompt, "tolist"):
            return ProcessedPrompt(None, self.check_token_ids(prompt, param))
        raise InvalidRequest(f"{param} must be a string, a list of token ids or a dict, got "
                             f"{type(prompt).__name__}", param)

    def check_token_ids(self, ids, param: str = "prompt") -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if not isinstance(ids, SequenceABC) or not all(_is_int(i) for i in ids):
            raise InvalidRequest(f"{param} token ids must be a list of ints, got {_short(ids)}",
                                 param)
        vocab = self.limits.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise InvalidRequest(f"{param} token ids out of range [0, {vocab}): "
                                 f"{[_short(b) for b in bad[:5]]}", param)
        return [int(i) for i in ids]

    @staticmethod
    def check_text(text, param: str) -> str:
        """Strings must be valid Unicode (JSON can carry lone surrogates such as "\\ud800")."""
        if not isinstance(text, str):
            raise InvalidRequest(f"{param} must be a string, got {type(text).__name__}", param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(f"{param} is not valid Unicode: {e.reason} at position "
                                 f"{e.start}", param) from None
        return text

    # ---- chat ----------------------------------------------------------------------------------
    def render_chat(self, conversation, *, chat_template: str | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    chat_template_kwargs: dict | None = None, tools: list | None = None,
                    documents: list | None = None, untrusted_template: bool = False) -> str:
        """A conversation (messages with string or text-part content) -> the prompt text.

        untrusted_template: the template came with the request; its render gets a time limit.
        """
        messages = self.normalize_messages(conversation)
        if continue_final_message and add_generation_prompt:
            raise InvalidRequest("continue_final_message and add_generation_prompt cannot both be "
                                 "true", "continue_final_message")
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise InvalidRequest("continue_final_message needs the last message to be the "
                                 "assistant's", "continue_final_message")
        kwargs = dict(chat_template_kwargs or {})
        if reserved := sorted(_RESERVED_TEMPLATE_KWARGS & set(kwargs)):
            raise InvalidRequest(f"chat_template_kwargs may not set {reserved}",
                                 "chat_template_kwargs")
        template = chat_template or self.chat_template
        if template is None:
            raise InvalidRequest("the model has no chat template; give one (chat_template=, or "
                                 "the server's --chat-template)", "messages")
        limit = self.template_timeout if untrusted_template else None
        try:
            with _time_limit(limit):
                return self.tokenizer.apply_chat_template(
                    messages, chat_template=template, tools=tools, documents=documents,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message, tokenize=False, **kwargs)
        except _TemplateTimeout:
            raise InvalidRequest(f"the chat template did not render within {limit:g} s",
                                 "chat_template") from None
        except Exception as e:  # noqa: BLE001 - a failing template is the request's fault
            raise InvalidRequest(f"chat template failed: {type(e).__name__}: {e}",
                                 "messages") from None

    def normalize_messages(self, conversation) -> list[dict]:
        """Messages as plain dicts; content a string (text parts joined by newlines, as vLLM's
        "string" content format does); anything else refused by name."""
        if not isinstance(conversation, SequenceABC) or not conversation:
            raise InvalidRequest("messages must be a non-empty list", "messages")
        out = []
        for i, msg in enumerate(conversation):
            param = f"messages[{i}]"
            if hasattr(msg, "model_dump"):
                msg = msg.model_dump(exclude_none=True)
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise InvalidRequest(f"{param} must be an object with a string 'role'", param)
            msg = dict(msg)
            msg["content"] = self._content_text(msg.get("content"), f"{param}.content")
            for key, value in msg.items():
                if isinstance(value, str):
                    self.check_text(value, f"{param}.{key}")
            out.append(msg)
        return out

    @staticmethod
    def _content_text(content, param: str) -> str:
        if content is None or isinstance(content, str):
            return content or ""
        if not isinstance(content, list):
            raise InvalidRequest(f"{param} must be a string or a list of parts", param)
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{param}: content part type {kind!r} is not supported "
                                     f"(text parts only; the model takes no images or audio)",
                                     param)
            texts.append(part["text"])
        return "\n".join(texts)

    def chat_prompt(self, conversation, add_special_tokens: bool = False,
                    **render_kwargs) -> ProcessedPrompt:
        text = self.render_chat(conversation, **render_kwargs)
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ProcessedPrompt(text, ids)

    # ---- sampling parameters and admission -----------------------------------------------------
    def check_params(self, params: SamplingParams, prompt_len: int, prompt_param: str = "prompt",
                     strict_context: bool = False) -> SamplingParams:
        """Engine-dependent checks; returns the params to run (max_tokens filled in and capped
        at the context, top_k >= V meaning off), so the worst case always fits the KV pool.

        strict_context: a max_tokens beyond the context is an error (the OpenAI server's rule)
        rather than capped (what LLM.generate does: generation stops at max_model_len, as in vLLM).
        """
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"sampling params must be SamplingParams, got "
                                 f"{type(params).__name__}")
        lim = self.limits
        for name in _FLOAT_FIELDS:
            if not math.isfinite(getattr(params, name)):
                raise InvalidRequest(f"{name} must be finite, got {getattr(params, name)}", name)
        if params.logprobs == -1:  # vLLM: the whole vocabulary, if max_logprobs allows it
            if lim.vocab_size > lim.max_logprobs:
                raise InvalidRequest(f"logprobs=-1 asks for the whole vocabulary ({lim.vocab_size} "
                                     f"tokens), above max_logprobs={lim.max_logprobs}", "logprobs")
            params = dataclasses.replace(params, logprobs=lim.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > lim.max_logprobs:
                raise InvalidRequest(f"{name}={value} exceeds max_logprobs={lim.max_logprobs}",
                                     name)
        if bad := [t for t in params.stop_token_ids if t >= lim.vocab_size]:
            raise InvalidRequest(f"stop_token_ids out of range [0, {lim.vocab_size}): {bad[:5]}",
                                 "stop_token_ids")
        for stop in params.stop_strings:
            self.check_text(stop, "stop")
        for name, ids in (("logit_bias", params.logit_bias or ()),
                          ("allowed_token_ids", params.allowed_token_ids or ())):
            if bad := [t for t in ids if t >= lim.vocab_size]:
                raise InvalidRequest(f"{name} has token ids outside the vocabulary [0, "
                                     f"{lim.vocab_size}): {bad[:5]}", name)
        for word in params.bad_words or ():
            self.check_text(word, "bad_words")
        if prompt_len == 0:
            raise InvalidRequest("the prompt is empty (0 tokens)", prompt_param)
        room = lim.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequest(f"the prompt has {prompt_len} tokens, at least as many as this "
                                 f"model's context (max_model_len={lim.max_model_len})", prompt_param,
                                 "context_length_exceeded")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room and not strict_context:
            max_tokens = room
        if max_tokens > room:
            raise InvalidRequest(
                f"This model's maximum context length is {lim.max_model_len} tokens. However, "
                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                f"{prompt_param}, {max_tokens} in the completion). Please reduce the length of "
                f"the {prompt_param} or completion.", prompt_param, "context_length_exceeded")
        if params.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens={params.min_tokens} exceeds the "
                                 f"{max_tokens} tokens the request may generate", "min_tokens")
        pages = -(-(prompt_len + max_tokens) // lim.page_size)
        if pages > lim.num_kv_pages:  # only when num_kv_pages was set below max_model_len
            raise InvalidRequest(f"the request needs {pages} KV pages at most but the pool has "
                                 f"{lim.num_kv_pages}", "max_tokens")
        changes = {"max_tokens": max_tokens}
        if params.top_k >= lim.vocab_size:  # vLLM's clamp: every token kept = off
            changes["top_k"] = 0
        return dataclasses.replace(params, **changes)


def _is_int(x) -> bool:
    """Python ints (not bools) and numpy integer scalars."""
    return (isinstance(x, int) and not isinstance(x, bool)) or type(x).__name__.startswith("int")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _TemplateTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Abort Python code run in this thread after `seconds` (a trace hook that checks the clock
    on every line: Jinja templates compile to Python, so even a loop that calls nothing stops).
    Only request-supplied templates pay for it."""
    if seconds is None:
        yield
        return
    deadline = time.monotonic() + seconds

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _TemplateTimeout()
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)
