"""The OpenAI-compatible routes (FastAPI): thin handlers over OpenAIServing, plus error mapping.

build_app(engine, config) -> an ASGI app (Gate around FastAPI) that uvicorn serves.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

import jaxserve
from jaxserve.server.async_engine import EngineDeadError
from jaxserve.server.gate import Gate
from jaxserve.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest,
                                      DetokenizeRequest, TokenizeRequest)
from jaxserve.server.serving import Generation, OpenAIServing, ServerConfig

logger = logging.getLogger("jaxserve.server")


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
            task.cancel()
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
        return _error(APIError(500, str(e), type="server_error", code="engine_dead"))


async def _respond(serving: OpenAIServing, gen: Generation, stream: bool, events, whole,
                   request: Request) -> Response:
    if stream:
        return _EngineStream(events(gen), lambda: serving.abort(gen))
    body = await _until_disconnect(whole(gen), request)
    if body is None:  # the client is gone; nobody reads this
        return Response(status_code=499)
    return JSONResponse(body)


def _add_generation_routes(app: FastAPI, serving: OpenAIServing) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        gen = await serving.start_completion(body)
        return await _respond(serving, gen, body.stream, serving.completion_events,
                              serving.completion_response, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        gen = await serving.start_chat(body)
        return await _respond(serving, gen, body.stream, serving.chat_events,
                              serving.chat_response, request)


def _add_info_routes(app: FastAPI, serving: OpenAIServing, started: int) -> None:
    @app.get("/v1/models")
    async def models() -> dict:
        data = [{"id": name, "object": "model", "created": started, "owned_by": "jaxserve",
                 "root": serving.root_model, "parent": None,
                 "max_model_len": serving.max_model_len} for name in serving.model_names]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Response:
        if serving.async_engine.error is not None:
            return _error(APIError(503, "the engine thread died", type="server_error",
                                   code="engine_dead"))
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


def build_app(engine, config: ServerConfig) -> Gate:
    """The ASGI app for `engine` (an LLMEngine nobody else steps). Starts its engine thread."""
    serving = OpenAIServing(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        serving.async_engine.stop()

    app = FastAPI(title="jaxserve", version=jaxserve.__version__, lifespan=lifespan)
    app.state.serving = serving
    _add_error_handlers(app)
    _add_generation_routes(app, serving)
    _add_info_routes(app, serving, int(time.time()))
    serving.async_engine.start()
    gate = Gate(app, api_key=config.api_key, max_body_bytes=config.max_request_body_bytes)
    gate.serving = serving
    return gate
