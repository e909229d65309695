"""`jaxserve serve [MODEL]`: flags (vLLM's spelling), engine start-up, uvicorn, SIGTERM drain.

Entry point of the server: starts the engine core process (or, with --engine-in-process, an
LLMEngine in this process), wraps it with openai.build_app, serves it; the
first SIGTERM/SIGINT drains (new requests get 503, in-flight ones finish), a second one exits now.
A dead engine (device error, a hung step) makes the process exit with EXIT_ENGINE_DEAD.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

from jaxserve.engine_core import EXIT_ENGINE_DEAD  # a supervisor should restart us
from jaxserve.server.lora_adapters import parse_lora_module
from jaxserve.server.serving import ServerConfig

logger = logging.getLogger("jaxserve.server")
API_KEY_ENVS = ("JAXSERVE_API_KEY", "VLLM_API_KEY")  # read when --api-key is not given


def _json_list(value: str) -> list[str]:
    """vLLM's spelling: a JSON list (`'["*"]'`)."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not (isinstance(parsed, list) and all(isinstance(v, str) for v in parsed)):
        raise argparse.ArgumentTypeError(f"{value!r} is not a JSON list of strings")
    return parsed


def _add_http_args(p: argparse.ArgumentParser) -> None:
    """vLLM's HTTP-layer flags: CORS, proxy prefix, TLS, request logging, the step watchdog."""
    p.add_argument("--allowed-origins", type=_json_list, default=["*"], help="CORS, a JSON list")
    p.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS, a JSON list")
    p.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS, a JSON list")
    p.add_argument("--allow-credentials", action="store_true", help="CORS credentials")
    p.add_argument("--root-path", default="", help="the path prefix of a proxy in front of us")
    p.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this key ...")
    p.add_argument("--ssl-certfile", default=None, help="... and this certificate")
    p.add_argument("--enable-log-requests", action="store_true", dest="enable_log_requests",
                   help="log each generation request (id, prompt lengths, fields)")
    p.add_argument("--disable-log-requests", action="store_false", dest="enable_log_requests",
                   help="vLLM's older flag; requests are not logged by default")
    p.add_argument("--engine-in-process", action="store_true",
                   help="step the engine in a thread of the API server's process instead of its "
                        "own engine core process (debugging; the HTTP work then shares its GIL)")
    p.add_argument("--nnodes", type=int, default=None,
                   help="processes (hosts) one engine spans (jax.distributed; docs/multi_gpu.md)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="this process's rank among --nnodes; 0 serves HTTP, the others follow")
    p.add_argument("--master-addr", default=None, help="rank 0's address (coordinator)")
    p.add_argument("--master-port", type=int, default=None,
                   help="rank 0's coordinator port (default 29500; commands use port + 1)")
    p.add_argument("--headless", action="store_true",
                   help="vLLM's flag for ranks > 0: no API server (implied by --node-rank > 0)")
    p.add_argument("--step-timeout", type=float, default=600.0,
                   help="seconds an engine step (compiles included) may take before the engine "
                        "is declared hung and the server exits; 0 turns the watchdog off")


def _add_tool_args(p: argparse.ArgumentParser) -> None:
    """vLLM's tool-calling and reasoning flags."""
    from jaxserve.reasoning import REASONING_PARSERS
    from jaxserve.tool_parsers import TOOL_PARSERS

    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto": parse the calls the model writes (needs '
                        "--tool-call-parser)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="the model's tool-call format (hermes: Qwen2/2.5/3, Hermes; llama3_json: "
                        "Llama 3.x; mistral: [TOOL_CALLS])")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="put <think>...</think> in reasoning_content (deepseek_r1: the template "
                        "opens <think>; qwen3: the model does)")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on jaxserve's sub-command parser; sets func=serve."""
    from jaxserve.cli import add_engine_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None,
                   help="hub repo id, HF dir or .gguf file; a preset with --load-format dummy "
                        "(default: the embedded SmolLM2)")
    p.add_argument("--model", dest="model_flag", default=None, help="same as MODEL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients may use in `model` (default: the model path)")
    p.add_argument("--chat-template", default=None, help="a Jinja file path or inline template")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let requests send their own chat_template (rendered with a time limit)")
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` (default: $JAXSERVE_API_KEY or "
                        "$VLLM_API_KEY, which keep the key out of the process list)")
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="503 + Retry-After once this many sequences wait")
    p.add_argument("--max-request-body-bytes", type=int, default=4 << 20)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get after SIGTERM")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="LoRA adapters served by name (needs --enable-lora): name=path or "
                        "'{\"name\": ..., \"path\": ...}'; requests pick one with `model`")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    p.add_argument("--api-server-count", type=int, default=1,
                   help="API server processes accepting on --host/--port (SO_REUSEPORT), each "
                        "with its own event loop, tokenizer and SSE, all feeding the one engine "
                        "core (or each --data-parallel-size replica). /metrics merges every "
                        "process's counters (those of the others up to 1 s old); runtime LoRA "
                        "loading is refused when N > 1 (use --lora-modules)")
    _add_tool_args(p)
    _add_http_args(p)
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


def api_key(args: argparse.Namespace) -> str | None:
    return args.api_key or next(filter(None, map(os.environ.get, API_KEY_ENVS)), None)


def http_options(args: argparse.Namespace):
    from jaxserve.server.openai import HTTPOptions

    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together: "
                         f"{args.ssl_keyfile=}, {args.ssl_certfile=}")
    return HTTPOptions(
        allowed_origins=tuple(args.allowed_origins), allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers), allow_credentials=args.allow_credentials,
        root_path=args.root_path, log_requests=args.enable_log_requests,
        step_timeout=args.step_timeout or None)


def server_config(args: argparse.Namespace) -> ServerConfig:
    if args.lora_modules and not args.enable_lora:
        raise ValueError(f"--lora-modules {' '.join(args.lora_modules)} needs --enable-lora")
    return ServerConfig(
        served_model_names=tuple(args.served_model_name or ()),
        chat_template=load_chat_template(args.chat_template), api_key=api_key(args),
        trust_request_chat_template=args.trust_request_chat_template,
        max_waiting_requests=args.max_waiting_requests,
        max_request_body_bytes=args.max_request_body_bytes, drain_timeout=args.drain_timeout,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        lora_modules=tuple(parse_lora_module(m) for m in args.lora_modules),
        api_server_count=args.api_server_count)


def _uvicorn_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first exit signal drains through the Gate instead of stopping."""

        def __init__(self, config: uvicorn.Config, gate, drain_timeout: float):
            super().__init__(config)
            self.gate, self.drain_timeout = gate, drain_timeout
            self.forward = None  # server 0 of --api-server-count: signal the others alike
            # API servers 1..N-1: a signal to the whole group arrives twice (direct, forwarded)
            self.debounce = 0.0  # seconds after the first signal in which another is the same
            self._first_signal = 0.0

        def handle_exit(self, sig: int, frame) -> None:
            if self.forward is not None:
                self.forward(sig)
            if self.gate.draining and time.monotonic() - self._first_signal < self.debounce:
                return
            self._first_signal = self._first_signal or time.monotonic()
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
                access_log: bool = True, ssl: tuple[str, str] | None = None):
    """A uvicorn server for `app` (a Gate) that drains on SIGTERM; call .run() or .serve().
    ssl: (keyfile, certfile) to serve HTTPS."""
    import uvicorn

    keyfile, certfile = ssl or (None, None)
    config = uvicorn.Config(app, host=host, port=port, http="h11", loop="asyncio",
                            lifespan="on", log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=2, timeout_keep_alive=5,
                            ssl_keyfile=keyfile, ssl_certfile=certfile)
    return _uvicorn_server_class()(config, app, drain_timeout)


def _exit_now(code: int) -> None:
    """Flush the logs and leave without running interpreter shutdown: a thread may be stuck in
    a device call, and tearing XLA's runtime down under it aborts the process (SIGABRT)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _on_dead(server_ref: list) -> None:
    """The engine is dead: let uvicorn answer what it holds and stop; exit non-zero either way."""
    logger.critical("the engine is dead; exiting with code %d so that a supervisor restarts the "
                    "server", EXIT_ENGINE_DEAD)
    if server_ref:
        server_ref[0].should_exit = True
    timer = threading.Timer(10.0, _exit_now, (EXIT_ENGINE_DEAD,))  # uvicorn's stop hung
    timer.daemon = True
    timer.start()


def serve(args: argparse.Namespace) -> int:
    from jaxserve.cli import engine_kwargs
    from jaxserve.config import EngineConfig
    from jaxserve.distributed import DistributedConfig, follow
    from jaxserve.engine import LLMEngine
    from jaxserve.server.api_servers import ApiServers, bind_socket
    from jaxserve.server.core_client import EngineCoreClient

    server_config(args)  # bad flags fail before the engine starts
    engine_config = EngineConfig(model=args.model_flag or args.model, usage_context="server",
                                 **engine_kwargs(args))
    multihost = DistributedConfig.from_env(nnodes=args.nnodes, node_rank=args.node_rank,
                                           master_addr=args.master_addr,
                                           master_port=args.master_port)
    count = args.api_server_count
    if count > 1 and (args.engine_in_process or multihost is not None):
        raise ValueError(f"--api-server-count {count} needs the engine core process on this "
                         "host: it cannot be combined with --engine-in-process or --nnodes > 1")
    if multihost is not None:  # one engine over several processes (jaxserve/distributed.py)
        if engine_config.data_parallel_size > 1 or args.engine_in_process:
            raise ValueError("--nnodes > 1 runs one engine core over all processes: it cannot "
                             "be combined with --data-parallel-size > 1 or --engine-in-process")
        if multihost.process_id != 0:  # vLLM's --headless: no API server here
            return follow(engine_config, multihost)
        if args.headless:
            raise ValueError("--headless is for --node-rank > 0; rank 0 serves the API")
        os.environ.update(multihost.to_env())  # the engine core process initializes from it
    log_level = logging.getLogger().level
    if args.engine_in_process:
        engine = LLMEngine(engine_config)
    elif engine_config.data_parallel_size > 1:  # N core processes behind a router
        from jaxserve.server.dp_router import DataParallelClient

        engine = DataParallelClient.launch(engine_config, log_level, num_clients=count)
    else:  # the engine loop in its own process; this one does HTTP, text and JSON
        engine = EngineCoreClient.launch(engine_config, log_level, num_clients=count)
    logger.info("engine ready in %.1fs: %s, max_model_len=%d, %d KV pages",
                engine.startup_seconds, engine.model_name, engine.max_model_len,
                engine.num_kv_pages)
    servers = sock = None
    if count > 1:  # bound now: connections made while the engine starts are refused, not queued
        sock = bind_socket(args.host, args.port)
        metrics_dir = tempfile.mkdtemp(prefix="jaxserve-metrics-")
        servers = ApiServers(args, sock.getsockname()[1], engine, log_level, metrics_dir)
        servers.start()
    serve_app(engine, args, sock, servers=servers,
              shared=None if servers is None else (metrics_dir, 0))


def _lead(server, servers) -> None:
    """API server 0: forward exit signals to the others; one dying drains the rest."""
    from jaxserve.server.api_servers import EXIT_API_SERVER_DIED

    def died(index: int, code: int | None) -> None:
        logger.critical("API server process %d exited (code %s); draining the others and "
                        "exiting with code %d", index, code, EXIT_API_SERVER_DIED)
        server.handle_exit(signal.SIGTERM, None)

    server.forward = servers.signal
    servers.watch(died)


def serve_app(engine, args: argparse.Namespace, sock=None, *, shared=None, on_started=None,
              servers=None):
    """Serve `engine` on sock (or --host/--port) until drained or dead, then exit the process.
    shared: (metrics directory, API server index) with --api-server-count > 1; on_started:
    called once the app is built; servers: API servers 1..N-1 (server 0 only)."""
    from jaxserve.server.api_servers import EXIT_API_SERVER_DIED
    from jaxserve.server.openai import build_app

    config, http = server_config(args), http_options(args)
    server_ref: list = []
    wait_servers = None if servers is None else (
        lambda: servers.wait(config.drain_timeout + 15.0))  # they share the core: stop it last
    app = build_app(engine, config, http, on_dead=lambda: _on_dead(server_ref),
                    before_stop=wait_servers)
    server = make_server(app, host=args.host, port=args.port, drain_timeout=config.drain_timeout,
                         log_level=args.uvicorn_log_level,
                         access_log=not args.disable_uvicorn_access_log,
                         ssl=(args.ssl_keyfile, args.ssl_certfile) if args.ssl_keyfile else None)
    server_ref.append(server)
    if on_started is not None:  # an API server other than 0
        server.debounce = 2.0
    if shared is not None:
        app.serving.metrics.share(*shared)
    if servers is not None:
        _lead(server, servers)
    # uvicorn handles signals while it runs and then restores these: a signal that arrives during
    # the shutdown after it (engine thread stopping) exits at once, cleanly, instead of killing the
    # process by the default action (exit -15 was seen in CI).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: _exit_now(0))
    if on_started is not None:
        on_started()
    server.run(sockets=None if sock is None else [sock])
    if servers is not None:  # they drain or fail their streams; the core outlives them
        wait_servers()
        shutil.rmtree(shared[0], ignore_errors=True)
        if servers.died and app.serving.async_engine.error is None:
            app.serving.async_engine.stop(timeout=10.0)
            _exit_now(EXIT_API_SERVER_DIED)
    # Leave without interpreter finalization, which restores the default signal actions while it
    # joins threads: a signal then killed the process (-15) after a clean drain.
    _exit_now(_shutdown(app.serving.async_engine))


def _shutdown(async_engine) -> int:
    """After uvicorn: stop the engine thread or core process (a forced exit skips the lifespan
    that does it) so no device call runs while the interpreter shuts down; exit at once if it
    cannot stop."""
    if async_engine.error is not None:
        _exit_now(EXIT_ENGINE_DEAD)
    async_engine.stop(timeout=10.0)
    if async_engine.running:
        logger.error("the engine thread is still inside a step; exiting without cleanup")
        _exit_now(0)
    return 0
