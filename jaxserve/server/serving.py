"""OpenAIServing: validated OpenAI requests -> engine requests; their outputs -> OpenAI bodies.

protocol.py (parsed body) -> here: model check, prompts -> token ids, limits, backpressure ->
AsyncEngine.add() -> RequestStream -> responses.py (whole body or SSE chunks).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from jaxserve import structured_outputs
from jaxserve.input_processor import InvalidRequest
from jaxserve.reasoning import get_reasoning_parser
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from jaxserve.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from jaxserve.server.core_client import EngineCoreClient
from jaxserve.server.dp_router import DataParallelClient
from jaxserve.server.lora_adapters import LoRAAdapters
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from jaxserve.server.responses import (ChoiceCursor, ResponseMeta, chat_body,
                                       chat_chunks, completion_body, completion_chunk, sse,
                                       token_id_text, usage_chunk)
from jaxserve.server.tools import ToolPlan, plan_tools, template_messages
from jaxserve.tool_parsers import get_tool_parser
from jaxserve.tool_parsers.chat import ChatOutputParser

logger = logging.getLogger("jaxserve.server")


def _inputs(fn, *args, **kwargs):
    """Call an InputProcessor method; its InvalidRequest becomes a 400 naming the field."""
    try:
        return fn(*args, **kwargs)
    except InvalidRequest as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None


INLINE_PROMPT_TOKENS = 8192  # token-id prompts up to this many in all validate on the loop


def _token_ids_only(prompt) -> bool:
    """A token-id prompt or a batch of them (no text to tokenize), INLINE_PROMPT_TOKENS at most."""
    if not isinstance(prompt, list) or not prompt:
        return False
    if all(type(t) is int for t in prompt):
        return len(prompt) <= INLINE_PROMPT_TOKENS
    return (all(isinstance(p, list) for p in prompt)
            and sum(map(len, prompt)) <= INLINE_PROMPT_TOKENS)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """`jaxserve serve` options that are not EngineConfig fields."""

    served_model_names: tuple[str, ...] = ()  # empty: the engine's model_name
    chat_template: str | None = None  # overrides the model's
    api_key: str | None = None  # required as "Authorization: Bearer ..." on /v1/*
    max_waiting_requests: int = 1024  # beyond this many waiting sequences: 503 + Retry-After
    max_request_body_bytes: int = 4 << 20  # larger bodies: 413
    drain_timeout: float = 30.0  # SIGTERM: seconds in-flight requests get to finish
    trust_request_chat_template: bool = False  # let requests send their own chat_template
    enable_auto_tool_choice: bool = False  # tool_choice "auto" parses calls with tool_call_parser
    tool_call_parser: str | None = None  # a jaxserve.tool_parsers.TOOL_PARSERS name
    reasoning_parser: str | None = None  # a jaxserve.reasoning.REASONING_PARSERS name
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, PEFT directory) per adapter
    api_server_count: int = 1  # API server processes (api_servers.py) sharing the engine core

    def __post_init__(self):
        if self.api_server_count < 1:
            raise ValueError(f"--api-server-count {self.api_server_count} must be at least 1")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.tool_call_parser is not None:
            get_tool_parser(self.tool_call_parser)  # ValueError naming the known ones
        if self.reasoning_parser is not None:
            get_reasoning_parser(self.reasoning_parser)


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
    """Holds the async engine (an AsyncEngine over an LLMEngine, or an EngineCoreClient) and the
    engine's read-only facts (tokenizer, limits, names)."""

    def __init__(self, engine, config: ServerConfig):
        self.config = config
        self.model_names = config.served_model_names or (engine.model_name,)
        self.root_model = engine.model_name
        self.loras = LoRAAdapters(enabled=engine.config.enable_lora,
                                  max_lora_rank=engine.config.max_lora_rank,
                                  base_model=self.model_names[0])
        for name, path in config.lora_modules:  # ValueError: the server does not start
            self.loras.add(name, path)
        self.metrics = ServerMetrics(self.model_names[0])
        if isinstance(engine, (EngineCoreClient, DataParallelClient)):  # engine process(es)
            engine.metrics = self.metrics
            self.async_engine = engine
        else:  # an LLMEngine: stepped by a thread of this process
            self.async_engine = AsyncEngine(engine, self.metrics)
        self.tokenizer = engine.tokenizer
        self.inputs = engine.input_processor  # the same intake LLM uses
        self.decode = engine.detokenizer.token_text  # the engine's cache, shared with Logprob
        self.detokenizer = engine.detokenizer
        self.chat_template = config.chat_template or engine.chat_template
        self.max_model_len = engine.max_model_len
        self.max_n = engine.config.max_num_seqs
        # Set by the engine once its sampler applies StructuredOutputsParams masks; until then
        # constrained requests (and tool_choice required / named) are compiled, then refused.
        self.structured_outputs_enabled = getattr(engine, "supports_structured_outputs", False)
        self.eos_token_ids = tuple(engine.eos_token_ids)  # the grammar cache the engine uses
        self.reasoning = (get_reasoning_parser(config.reasoning_parser)
                          if config.reasoning_parser else None)

    # ---- prompts -------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        if model:
            _inputs(self.inputs.check_text, model, "model")
        if model and model not in self.model_names and model not in self.loras.by_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model",
                           code="model_not_found")
        return model or self.model_names[0]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return _inputs(self.inputs.process_prompt, text, "prompt", add_special_tokens).token_ids

    def completion_prompts(self, prompt, echo: bool = False) -> list[dict]:
        """str | list[str] | list[int] | list[list[int]] -> engine prompt dicts (validated)."""
        out = []
        for p in _inputs(self.inputs.prompt_list, prompt, "prompt"):
            processed = _inputs(self.inputs.process_prompt, p, "prompt")
            text = processed.text
            if text is None and echo:
                text = self.detokenizer.decode(processed.token_ids, skip_special_tokens=False)
            out.append({"prompt": text, "prompt_token_ids": processed.token_ids})
        return out

    def render_chat(self, messages, add_generation_prompt: bool = True,
                    template: str | None = None, **kwargs) -> str:
        """The model's (or --chat-template's) template; one sent with the request only under
        --trust-request-chat-template, and then with a time limit."""
        if template is not None and not self.config.trust_request_chat_template:
            raise APIError(400, "chat_template in the request is refused: start the server with "
                                "--trust-request-chat-template to allow it",
                           param="chat_template")
        return _inputs(self.inputs.render_chat, messages,
                       chat_template=template or self.chat_template,
                       add_generation_prompt=add_generation_prompt,
                       untrusted_template=template is not None, **kwargs)

    def chat_prompt(self, body: ChatCompletionRequest, tools: list[dict] | None) -> dict:
        text = self.render_chat(template_messages(body.messages), body.add_generation_prompt,
                                body.chat_template,
                                continue_final_message=body.continue_final_message,
                                chat_template_kwargs=body.chat_template_kwargs, tools=tools,
                                documents=body.documents)
        return {"prompt": text, "prompt_token_ids": self.tokenize(text, body.add_special_tokens)}

    def tool_plan(self, body: ChatCompletionRequest) -> ToolPlan:
        return plan_tools(body, self.config.tool_call_parser
                          if self.config.enable_auto_tool_choice else None)

    def structured(self, body, forced: StructuredOutputsParams | None = None
                   ) -> StructuredOutputsParams | None:
        """The request's output constraint (response_format, structured_outputs, guided_*, or
        the grammar of a forced tool choice), compiled once here so a bad one is a 400 naming
        its field; refused while the engine cannot apply it."""
        params, field = body.structured_outputs_params()
        if forced is not None:
            if params is not None:
                raise APIError(400, f"{field} cannot be combined with tool_choice "
                                    f"{body.tool_choice!r:.100}", param=field)
            params, field = forced, "tool_choice"
        if params is None:
            return None
        try:
            structured_outputs.compile(params, self.tokenizer, self.eos_token_ids)
        except ValueError as e:
            raise APIError(400, f"{field}: {e}", param=field) from None
        if not self.structured_outputs_enabled:
            what = f"tool_choice={body.tool_choice!r:.100}" if field == "tool_choice" else field
            raise APIError(400, f"{what} is not supported by jaxserve yet: the sampler does not "
                                "apply grammar masks yet", param=field, code="unsupported_field")
        return params

    async def _constraint(self, body, forced: StructuredOutputsParams | None = None
                          ) -> StructuredOutputsParams | None:
        """structured() in a worker thread (a grammar compiles for a while), skipped for the
        usual request without a constraint: no thread hop and its turn of the event loop."""
        if forced is None and body.structured_outputs_params()[0] is None:
            return None
        return await asyncio.to_thread(self.structured, body, forced)

    def output_parser(self, plan: ToolPlan | None):
        """A per-choice ChatOutputParser factory, or None when the text is the content as is."""
        tools = plan.parser if plan is not None else None
        if tools is None and self.reasoning is None:
            return None
        max_calls = plan.max_calls if plan is not None else None
        return lambda: ChatOutputParser(self.reasoning, tools, max_calls)

    # ---- admission -----------------------------------------------------------------------------
    def _admit(self, prompts: list[dict], params, prompt_param: str) -> None:
        """Per-prompt limits (context, KV pool) and the waiting bound, counted in sequences: a
        request that would overflow it is refused whole."""
        if params.n > self.max_n:
            raise APIError(400, f"n={params.n} exceeds the server's limit of {self.max_n}",
                           param="n")
        for p in prompts:
            _inputs(self.inputs.check_params, params, len(p["prompt_token_ids"]), prompt_param,
                    strict_context=True)
        new = len(prompts) * params.n
        waiting = self.async_engine.num_waiting
        if waiting + new > self.config.max_waiting_requests:
            raise APIError(503, f"the server is overloaded: {waiting} sequences wait and this "
                                f"request adds {new} (limit {self.config.max_waiting_requests}); "
                                "retry later", type="server_error", code="overloaded",
                           headers={"Retry-After": "1"})

    async def _start(self, prefix: str, prompts: list[dict], params) -> RequestStream:
        base = f"{prefix}-{uuid.uuid4().hex}"
        items = [(f"{base}-{i}", p, params) for i, p in enumerate(prompts)]
        try:
            return await self.async_engine.add(items)
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from e
        except EngineDeadError as e:
            raise APIError(500, str(e), type="server_error", code="engine_dead") from e

    def _params(self, body, keep_special_tokens: bool = False, **kw):
        try:
            params = body.sampling_params(defaults=self.inputs.defaults, **kw)
        except ValueError as e:  # SamplingParams' messages start with the field's name
            param = getattr(e, "param", None) or next(
                (f for f in sorted(SamplingParams.__dataclass_fields__, key=len, reverse=True)
                 if str(e).startswith(f)), None)
            raise APIError(400, str(e), param=param) from e
        if keep_special_tokens:  # the tool parser's markers are special tokens ([TOOL_CALLS])
            params.skip_special_tokens = False
        return params

    def _check_request(self, body) -> str:
        model = self.check_model(body.model)
        for name in body.refuse_unimplemented():
            logger.debug("ignoring unknown request field %r", name)
        return model

    async def start_completion(self, body: CompletionRequest) -> Generation:
        model = self._check_request(body)
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        # Token ids only validate: cheaper here than a thread hop, whose way back waits a turn
        # of the event loop (every stream's chunk) before the engine's TTFT clock starts at
        # add(): 300 ms unseen by /metrics in a wave of 1,000 requests on 2 cores (issue 20).
        if not body.echo and _token_ids_only(body.prompt):
            prompts = self.completion_prompts(body.prompt)
        else:
            prompts = await asyncio.to_thread(self.completion_prompts, body.prompt, body.echo)
        prompts = self._with_lora(prompts, model)
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        prompt_lp = max((k for k in (echo_lp, self._prompt_logprobs(body)) if k is not None),
                        default=None)
        constraint = await self._constraint(body)
        params = self._params(body, max_tokens=body.max_tokens, logprobs=body.logprobs,
                              prompt_logprobs=prompt_lp, structured_outputs=constraint)
        self._admit(prompts, params, "prompt")
        stream = await self._start("cmpl", prompts, params)
        meta = ResponseMeta(stream.request_ids[0].rsplit("-", 1)[0], int(time.time()), model,
                            body.logprobs, self._decoder(body), body.include_usage,
                            prompt_logprobs=body.prompt_logprobs)
        return Generation(stream, meta, prompts, echo=body.echo)

    async def start_chat(self, body: ChatCompletionRequest) -> Generation:
        model = self._check_request(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        top = (body.top_logprobs or 0) if body.logprobs else None
        plan = self.tool_plan(body)
        [prompt] = self._with_lora([await asyncio.to_thread(self.chat_prompt, body, plan.tools)],
                                   model)
        constraint = await self._constraint(body, plan.grammar)
        params = self._params(body, max_tokens=body.max_new_tokens, logprobs=top,
                              prompt_logprobs=self._prompt_logprobs(body),
                              structured_outputs=constraint,
                              keep_special_tokens=bool(plan.parser
                                                       and plan.parser.needs_special_tokens))
        self._admit([prompt], params, "messages")
        stream = await self._start("chatcmpl", [prompt], params)
        meta = ResponseMeta(stream.request_ids[0].rsplit("-", 1)[0], int(time.time()), model,
                            top, self._decoder(body), body.include_usage,
                            output_parser=self.output_parser(plan),
                            prompt_logprobs=body.prompt_logprobs)
        return Generation(stream, meta, [prompt])

    @staticmethod
    def _prompt_logprobs(body) -> int | None:
        """vLLM's prompt_logprobs field: in the non-streamed response only (as vLLM's chat)."""
        if body.prompt_logprobs is not None and body.stream:
            raise APIError(400, "prompt_logprobs is not supported with stream=true",
                           param="prompt_logprobs")
        return body.prompt_logprobs

    def _with_lora(self, prompts: list[dict], model: str) -> list[dict]:
        """`model` naming an adapter: its LoRARequest rides in each prompt (engine.add_request)."""
        lora = self.loras.by_name.get(model)
        return prompts if lora is None else [{**p, "lora_request": lora} for p in prompts]

    def _decoder(self, body):
        return token_id_text if body.return_tokens_as_token_ids else self.decode

    def abort(self, gen: Generation) -> None:
        if len(gen.finished) < len(gen.stream.request_ids):
            self.async_engine.abort(gen.stream)

    # ---- results -------------------------------------------------------------------------------
    async def collect(self, gen: Generation) -> None:
        """Wait for every engine request of `gen` to finish (aborts them if cancelled)."""
        gen.stream.final_only = True  # text is built once, at the end
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
        new_parser = gen.meta.output_parser or (lambda: None)
        async for out in self._outputs(gen):
            for c in out.outputs:
                if c.index not in cursors:
                    cursors[c.index] = ChoiceCursor(c.index, parser=new_parser())
                cur = cursors[c.index]
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
        except EngineDeadError as e:  # or its RequestFailedError (code internal_error)
            gen.error = APIError(500, str(e), type="server_error", code=e.code)

    async def _tail(self, gen: Generation, chat: bool):
        if gen.error is not None:
            yield sse(gen.error.body())
        elif gen.meta.include_usage:
            yield sse(usage_chunk(gen.meta, chat, gen.ordered()))
        yield sse("[DONE]")

