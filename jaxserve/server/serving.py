"""OpenAIServing: validated OpenAI requests -> engine requests; their outputs -> OpenAI bodies.

protocol.py (parsed body) -> here: model check, prompts -> token ids, limits, backpressure ->
AsyncEngine.add() -> RequestStream -> responses.py (whole body or SSE chunks).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from jaxserve.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.protocol import (APIError, ChatCompletionRequest, ChatMessage,
                                      CompletionRequest)
from jaxserve.server.responses import (ChoiceCursor, ResponseMeta, TokenDecoder, chat_body,
                                       chat_chunks, completion_body, completion_chunk, sse,
                                       token_id_text, usage_chunk)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """`jaxserve serve` options that are not EngineConfig fields."""

    served_model_names: tuple[str, ...] = ()  # empty: the engine's model_name
    chat_template: str | None = None  # overrides the model's
    api_key: str | None = None  # required as "Authorization: Bearer ..." on /v1/*
    max_waiting_requests: int = 1024  # beyond this many waiting sequences: 503 + Retry-After
    max_request_body_bytes: int = 4 << 20  # larger bodies: 413
    drain_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish


@dataclass
class Generation:
    """One accepted HTTP request: its engine stream and what its bodies need."""

    stream: RequestStream
    meta: ResponseMeta
    prompts: list[dict]  # {"prompt": str, "prompt_token_ids": list[int]} per engine request
    echo: bool = False
    finished: dict[str, object] = field(default_factory=dict)  # request id -> final output
    error: APIError | None = None  # set when the engine died mid-stream

    def ordered(self) -> list:
        return [self.finished[rid] for rid in self.stream.request_ids]


class OpenAIServing:
    """Holds the AsyncEngine and the engine's read-only facts (tokenizer, limits, names)."""

    def __init__(self, engine, config: ServerConfig):
        self.config = config
        self.model_names = config.served_model_names or (engine.model_name,)
        self.root_model = engine.model_name
        self.metrics = ServerMetrics(self.model_names[0])
        self.async_engine = AsyncEngine(engine, self.metrics)
        self.tokenizer = engine.tokenizer
        self.decode = TokenDecoder(engine.tokenizer)
        self.chat_template = config.chat_template or engine.chat_template
        self.max_model_len = engine.max_model_len
        self.max_n = engine.config.max_num_seqs
        self.max_logprobs = engine.config.max_logprobs

    # ---- prompts -------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        if model and model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")
        return model or self.model_names[0]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def completion_prompts(self, prompt) -> list[dict]:
        """str | list[str] | list[int] | list[list[int]] -> engine prompt dicts."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append({"prompt": p, "prompt_token_ids": self.tokenize(p)})
            else:
                out.append({"prompt": self.tokenizer.decode(p), "prompt_token_ids": list(p)})
        return out

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    template: str | None = None, continue_final_message: bool = False,
                    kwargs: dict | None = None) -> str:
        template = template or self.chat_template
        if template is None:
            raise APIError(400, "the model has no chat template; start the server with "
                                "--chat-template", param="messages")
        try:
            return self.tokenizer.apply_chat_template(
                [m.as_template_dict() for m in messages], chat_template=template,
                tokenize=False, add_generation_prompt=add_generation_prompt and not
                continue_final_message, continue_final_message=continue_final_message,
                **(kwargs or {}))
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise APIError(400, f"chat template failed: {e}", param="messages") from e

    def chat_prompt(self, body: ChatCompletionRequest) -> dict:
        text = self.render_chat(body.messages, body.add_generation_prompt, body.chat_template,
                                body.continue_final_message, body.chat_template_kwargs)
        return {"prompt": text, "prompt_token_ids": self.tokenize(text, add_special_tokens=False)}

    # ---- admission -----------------------------------------------------------------------------
    def _check_limits(self, prompts: list[dict], max_tokens: int | None, n: int,
                      param: str) -> None:
        if n > self.max_n:
            raise APIError(400, f"n={n} exceeds the server's limit of {self.max_n}", param="n")
        for p in prompts:
            num = len(p["prompt_token_ids"])
            wanted = num + (max_tokens or 1)
            if wanted > self.max_model_len:
                raise APIError(
                    400, f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, you requested {wanted} tokens ({num} in the {param}, "
                    f"{max_tokens or 1} in the completion). Please reduce the length of the "
                    f"{param} or completion.", param=param, code="context_length_exceeded")
        if self.async_engine.num_waiting >= self.config.max_waiting_requests:
            raise APIError(503, "the server is overloaded: too many waiting requests; retry "
                                "later", type="server_error", code="overloaded",
                           headers={"Retry-After": "1"})

    async def _start(self, prefix: str, prompts: list[dict], params) -> RequestStream:
        base = f"{prefix}-{uuid.uuid4().hex}"
        items = [(f"{base}-{i}", p, params) for i, p in enumerate(prompts)]
        try:
            return await self.async_engine.add(items)
        except ValueError as e:
            raise APIError(400, str(e)) from e
        except EngineDeadError as e:
            raise APIError(500, str(e), type="server_error", code="engine_dead") from e

    @staticmethod
    def _params(body, **kw):
        try:
            return body.sampling_params(**kw)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def start_completion(self, body: CompletionRequest) -> Generation:
        model = self.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.logprobs is not None and body.logprobs > self.max_logprobs:
            raise APIError(400, f"logprobs={body.logprobs} exceeds the server's limit of "
                                f"{self.max_logprobs}", param="logprobs")
        prompts = await asyncio.to_thread(self.completion_prompts, body.prompt)
        self._check_limits(prompts, body.max_tokens, body.n, "prompt")
        prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
        params = self._params(body, max_tokens=body.max_tokens, logprobs=body.logprobs,
                              prompt_logprobs=prompt_lp)
        stream = await self._start("cmpl", prompts, params)
        meta = ResponseMeta(stream.request_ids[0].rsplit("-", 1)[0], int(time.time()), model,
                            body.logprobs, self._decoder(body), body.include_usage)
        return Generation(stream, meta, prompts, echo=body.echo)

    async def start_chat(self, body: ChatCompletionRequest) -> Generation:
        model = self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        if top is not None and top > self.max_logprobs:
            raise APIError(400, f"top_logprobs={top} exceeds the server's limit of "
                                f"{self.max_logprobs}", param="top_logprobs")
        prompt = await asyncio.to_thread(self.chat_prompt, body)
        self._check_limits([prompt], body.max_new_tokens, body.n, "messages")
        params = self._params(body, max_tokens=body.max_new_tokens, logprobs=top)
        stream = await self._start("chatcmpl", [prompt], params)
        meta = ResponseMeta(stream.request_ids[0].rsplit("-", 1)[0], int(time.time()), model,
                            top, self._decoder(body), body.include_usage)
        return Generation(stream, meta, [prompt])

    def _decoder(self, body):
        return token_id_text if body.return_tokens_as_token_ids else self.decode

    def abort(self, gen: Generation) -> None:
        if len(gen.finished) < len(gen.stream.request_ids):
            self.async_engine.abort(gen.stream)

    # ---- results -------------------------------------------------------------------------------
    async def collect(self, gen: Generation) -> None:
        """Wait for every engine request of `gen` to finish (aborts them if cancelled)."""
        try:
            async for out in gen.stream:
                if out.finished:
                    gen.finished[out.request_id] = out
        finally:
            self.abort(gen)

    async def completion_response(self, gen: Generation) -> dict:
        await self.collect(gen)
        echo = [p["prompt"] for p in gen.prompts] if gen.echo else None
        return completion_body(gen.meta, gen.ordered(), echo)

    async def chat_response(self, gen: Generation) -> dict:
        await self.collect(gen)
        return chat_body(gen.meta, gen.ordered()[0])

    async def completion_events(self, gen: Generation) -> AsyncIterator[str]:
        index = {rid: i for i, rid in enumerate(gen.stream.request_ids)}
        cursors: dict[tuple[int, int], ChoiceCursor] = {}
        n = None
        async for out in self._outputs(gen):
            p = index[out.request_id]
            n = n or len(out.outputs)
            echo = (gen.prompts[p]["prompt"], out) if gen.echo else None
            for c in out.outputs:
                cur = cursors.setdefault((p, c.index), ChoiceCursor(p * n + c.index))
                if (chunk := completion_chunk(gen.meta, cur, c, echo)) is not None:
                    yield sse(chunk)
        async for tail in self._tail(gen, chat=False):
            yield tail

    async def chat_events(self, gen: Generation) -> AsyncIterator[str]:
        cursors: dict[int, ChoiceCursor] = {}
        async for out in self._outputs(gen):
            for c in out.outputs:
                cur = cursors.setdefault(c.index, ChoiceCursor(c.index))
                for chunk in chat_chunks(gen.meta, cur, c):
                    yield sse(chunk)
        async for tail in self._tail(gen, chat=True):
            yield tail

    async def _outputs(self, gen: Generation):
        try:
            async for out in gen.stream:
                if out.finished:
                    gen.finished[out.request_id] = out
                yield out
        except EngineDeadError as e:
            gen.error = APIError(500, str(e), type="server_error", code="engine_dead")

    async def _tail(self, gen: Generation, chat: bool):
        if gen.error is not None:
            yield sse(gen.error.body())
        elif gen.meta.include_usage:
            yield sse(usage_chunk(gen.meta, chat, gen.ordered()))
        yield sse("[DONE]")
