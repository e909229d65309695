"""`jaxserve serve [MODEL]`: flags (vLLM's spelling), engine start-up, uvicorn, SIGTERM drain.

Entry point of the server: builds an LLMEngine, wraps it with openai.build_app, serves it; the
first SIGTERM/SIGINT drains (new requests get 503, in-flight ones finish), a second one exits now.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from jaxserve.server.serving import ServerConfig

logger = logging.getLogger("jaxserve.server")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on jaxserve's sub-command parser; sets func=serve."""
    from jaxserve.cli import add_engine_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None,
                   help="HF dir, .gguf file or preset (default: the embedded SmolLM2)")
    p.add_argument("--model", dest="model_flag", default=None, help="same as MODEL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients may use in `model` (default: the model path)")
    p.add_argument("--chat-template", default=None, help="a Jinja file path or inline template")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests send their own chat_template (rendered with a time limit)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1")
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="503 + Retry-After once this many sequences wait")
    p.add_argument("--max-request-body-bytes", type=int, default=4 << 20)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=serve)
    return p


def load_chat_template(value: str | None) -> str | None:
    """A path to a template file, or the template itself (anything with Jinja syntax)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        served_model_names=tuple(args.served_model_name or ()),
        chat_template=load_chat_template(args.chat_template), api_key=args.api_key,
        trust_request_chat_template=args.trust_request_chat_template,
        max_waiting_requests=args.max_waiting_requests,
        max_request_body_bytes=args.max_request_body_bytes, drain_timeout=args.drain_timeout)


def _uvicorn_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first exit signal drains through the Gate instead of stopping."""

        def __init__(self, config: uvicorn.Config, gate, drain_timeout: float):
            super().__init__(config)
            self.gate, self.drain_timeout = gate, drain_timeout

        def handle_exit(self, sig: int, frame) -> None:
            if self.gate.draining:  # second signal: stop now
                self.should_exit = self.force_exit = True
                return
            self.gate.draining = True
            logger.info("signal %s: draining %d in-flight requests (at most %.0fs)",
                        signal.Signals(sig).name, self.gate.in_flight, self.drain_timeout)
            threading.Thread(target=self._drain, name="jaxserve-drain", daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + self.drain_timeout
            while self.gate.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            logger.info("drain done (%d requests left); shutting down", self.gate.in_flight)
            self.should_exit = True

    return DrainingServer


def make_server(app, *, host: str, port: int, drain_timeout: float, log_level: str = "info",
                access_log: bool = True):
    """A uvicorn server for `app` (a Gate) that drains on SIGTERM; call .run() or .serve()."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, http="h11", loop="asyncio",
                            lifespan="on", log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=2, timeout_keep_alive=5)
    return _uvicorn_server_class()(config, app, drain_timeout)


def serve(args: argparse.Namespace) -> int:
    from jaxserve.cli import engine_kwargs
    from jaxserve.config import EngineConfig
    from jaxserve.engine import LLMEngine
    from jaxserve.server.openai import build_app

    config = server_config(args)
    engine = LLMEngine(EngineConfig(model=args.model_flag or args.model, **engine_kwargs(args)))
    logger.info("engine ready in %.1fs: %s, max_model_len=%d, %d KV pages",
                engine.startup_seconds, engine.model_name, engine.max_model_len,
                engine.num_kv_pages)
    app = build_app(engine, config)
    server = make_server(app, host=args.host, port=args.port, drain_timeout=config.drain_timeout,
                         log_level=args.uvicorn_log_level,
                         access_log=not args.disable_uvicorn_access_log)
    server.run()
    return 0
