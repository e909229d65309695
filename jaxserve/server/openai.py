"""The OpenAI-compatible routes (FastAPI): thin handlers over OpenAIServing, plus error mapping.

build_app(engine, config, http) -> an ASGI app (Gate around CORS around FastAPI) that uvicorn
serves. Every error, FastAPI's own included, leaves in OpenAI's shape.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

import jaxserve
from jaxserve.server.async_engine import DEAD_MESSAGE, EngineDeadError
from jaxserve.server.gate import Gate
from jaxserve.server.lora_adapters import add_lora_routes
from jaxserve.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, TokenizeRequest)
from jaxserve.server.serving import Generation, OpenAIServing, ServerConfig

logger = logging.getLogger("jaxserve.server")


@dataclass(frozen=True, kw_only=True)
class HTTPOptions:
    """`jaxserve serve` options of the HTTP layer (vLLM's flags and defaults)."""

    allowed_origins: tuple[str, ...] = ("*",)  # CORS
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    root_path: str = ""  # the prefix a proxy serves us under; routes answer with and without it
    log_requests: bool = False  # one INFO line per generation request
    step_timeout: float | None = None  # watchdog: a longer engine step means a hung device


class _EngineStream(StreamingResponse):
    """SSE response that aborts its engine requests however it ends (even if never iterated)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _until_disconnect(work, request: Request):
    """Run `work` (a coroutine); cancel it (aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # only requests cancellation: wait until it has unwound (and aborted)
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return None
    return task.result()


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid request')}" if param else \
        first.get("msg", "invalid request")
    return _error(APIError(400, message, param=param, code="invalid_value"))


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e)

    @app.exception_handler(EngineDeadError)
    async def dead(_request, e: EngineDeadError) -> JSONResponse:
        return _error(APIError(500, str(e), type="server_error", code=e.code))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        """FastAPI's own 404, 405 and body-parse 400s."""
        message = {404: f"no route {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_body")
        return _error(APIError(e.status_code, message.get(e.status_code, str(e.detail)),
                               code=code, headers=e.headers))

    @app.exception_handler(Exception)
    async def internal(_request, _e: Exception) -> JSONResponse:
        """A bug: Starlette re-raises it after this answer, so uvicorn logs the traceback."""
        return _error(APIError(500, "internal server error (the server log has the details)",
                               type="server_error", code="internal_error"))


def _log_request(gen: Generation, body) -> None:
    """--enable-log-requests: the request id, prompt lengths and the fields the client set."""
    fields = body.model_dump(exclude_unset=True, exclude={"prompt", "messages"})
    logger.info("Received request %s: prompt tokens %s, fields %s",
                gen.stream.request_ids[0].rsplit("-", 1)[0],
                [len(p["prompt_token_ids"]) for p in gen.prompts], fields)


async def _respond(serving: OpenAIServing, gen: Generation, body, events, whole,
                   request: Request) -> Response:
    if request.app.state.log_requests:
        _log_request(gen, body)
    if body.stream:
        return _EngineStream(events(gen), lambda: serving.abort(gen))
    result = await _until_disconnect(whole(gen), request)
    if result is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    return Response(orjson.dumps(result), media_type="application/json")


def _add_generation_routes(app: FastAPI, serving: OpenAIServing) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gen = await serving.start_completion(body)
        return await _respond(serving, gen, body, serving.completion_events,
                              serving.completion_response, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        gen = await serving.start_chat(body)
        return await _respond(serving, gen, body, serving.chat_events,
                              serving.chat_response, request)


def _add_info_routes(app: FastAPI, serving: OpenAIServing, started: int) -> None:
    @app.get("/v1/models")
    async def models() -> dict:
        data = [{"id": name, "object": "model", "created": started, "owned_by": "jaxserve",
                 "root": serving.root_model, "parent": None,
                 "max_model_len": serving.max_model_len} for name in serving.model_names]
        data += serving.loras.model_cards(started, serving.max_model_len)
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Response:
        if serving.async_engine.error is not None:
            return _error(APIError(503, DEAD_MESSAGE, type="server_error", code="engine_dead"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        text = serving.metrics.render(serving.async_engine.gauges)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        """vLLM's route (dev mode there): benchmarks call it so warm-up prompts stay uncached."""
        if not await serving.async_engine.reset_prefix_cache():
            raise APIError(409, "requests are running; reset the prefix cache when idle",
                           type="conflict_error")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": jaxserve.__version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            text = serving.render_chat(body.messages, body.add_generation_prompt)
            ids = serving.tokenize(text, add_special_tokens=False)
        else:
            ids = serving.tokenize(body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        serving.check_model(body.model)
        vocab = len(serving.tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}",
                           param="tokens")
        return {"prompt": serving.tokenizer.decode(body.tokens)}


def build_app(engine, config: ServerConfig, http: HTTPOptions | None = None,
              on_dead=None, before_stop=None) -> Gate:
    """The ASGI app for `engine`: an EngineCoreClient (the engine core process), or an LLMEngine
    nobody else steps (then a thread of this process steps it). Starts its threads;
    `on_dead()` runs once if the engine breaks (the CLI exits so a supervisor restarts it);
    `before_stop()` runs (in a thread) at shutdown before the engine is stopped (API server 0
    waits there for the other API server processes, which share the engine core)."""
    http = http or HTTPOptions()
    serving = OpenAIServing(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if before_stop is not None:
            await asyncio.to_thread(before_stop)
        serving.async_engine.stop()

    app = FastAPI(title="jaxserve", version=jaxserve.__version__, lifespan=lifespan,
                  root_path=http.root_path)
    app.state.serving = serving
    app.state.log_requests = http.log_requests
    app.add_middleware(CORSMiddleware, allow_origins=list(http.allowed_origins),
                       allow_methods=list(http.allowed_methods),
                       allow_headers=list(http.allowed_headers),
                       allow_credentials=http.allow_credentials)
    _add_error_handlers(app)
    _add_generation_routes(app, serving)
    _add_info_routes(app, serving, int(time.time()))
    if serving.loras.enabled:
        add_lora_routes(app, serving.loras, config.api_server_count)
    serving.async_engine.step_timeout = http.step_timeout
    serving.async_engine.on_dead = on_dead
    serving.async_engine.start()
    gate = Gate(app, api_key=config.api_key, max_body_bytes=config.max_request_body_bytes,
                root_path=http.root_path)
    gate.serving = serving
    return gate
