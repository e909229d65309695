"""EngineCoreClient: the API server's side of the engine core process (jaxserve/engine_core.py).

handler --add/abort--> sender thread --pipe--> core process --pipe--> receiver thread
--call_soon_threadsafe (one per event loop per step)--> RequestMirror.apply + RequestStream.push.
It has AsyncEngine's interface (add, gauges and num_waiting from their shared EngineFrontend;
abort, reset_prefix_cache, error, on_dead), so OpenAIServing does not know which one it holds. If the core process dies (a broken
engine, the watchdog, or a kill), every in-flight request fails with EngineDeadError and
`on_dead` runs once (the CLI exits with EXIT_ENGINE_DEAD). With `--api-server-count N` the core
has N pipe pairs (spawn's num_clients): the API server that started it holds the process, the
others attach() to theirs (SharedCore: they hang up instead of stopping it).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from jaxserve.detokenizer import Detokenizer
from jaxserve.input_processor import InputProcessor
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.async_engine import DEAD_MESSAGE, EngineDeadError, EngineFrontend, \
    RequestFailedError, RequestStream, call_in_loop, resolve_future
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.output_mirror import RequestMirror

logger = logging.getLogger("jaxserve.server")


@dataclass
class _Route:
    """One engine request's stream and mirror; the rest is receiver-thread bookkeeping."""

    stream: RequestStream
    mirror: RequestMirror
    arrival: float
    num_tokens: int = 0
    last_token_time: float = 0.0
    finishes: dict = field(default_factory=dict)  # sequence index -> finish reason
    first_token_time: float = 0.0  # in the core (engine_core.RequestDelta's first)


def _apply(items: list[tuple[_Route, tuple]]) -> None:
    """Event loop thread: append the step's deltas, wake the streams."""
    for route, (rid, seq_deltas, first) in items:
        route.mirror.apply(seq_deltas, first)
        route.stream.push(rid, route.mirror)


_ENV_LOCK = threading.Lock()  # replicas launch from several threads (dp_router)
PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size: ~16 steps of 1,000 sequences' deltas


def _widen(connection) -> None:
    """Grow a pipe's kernel buffer from 64 KiB, so the core's send of one step's deltas does not
    wait for this process's receiver thread (which needs the GIL) to read the previous ones."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or above pipe-max-size
        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)


class SharedCore:
    """The core process as seen by an API server process that did not start it: it can neither
    join nor kill it, and its stop() only hangs up (the core aborts that server's requests)."""

    pid = exitcode = None

    def __init__(self):
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def join(self, timeout: float | None = None) -> None:
        self.alive = False

    def kill(self) -> None:
        self.alive = False


class EngineCoreClient(EngineFrontend):
    """Starts the engine core process (launch), then carries requests to it and deltas back."""

    def __init__(self, process, commands, outputs, facts):
        self.process = process
        self._commands = commands  # write end
        self._outputs = outputs  # read end
        self.facts = facts
        # What OpenAIServing reads of an engine:
        self.model_name, self.tokenizer = facts.model_name, facts.tokenizer
        self.chat_template, self.eos_token_ids = facts.chat_template, facts.eos_token_ids
        self.max_model_len, self.num_kv_pages = facts.max_model_len, facts.num_kv_pages
        self.config, self.startup_seconds = facts.config, facts.startup_seconds
        self.supports_structured_outputs = facts.supports_structured_outputs
        self.input_processor = InputProcessor(facts.tokenizer, facts.chat_template, facts.limits,
                                              defaults=facts.sampling_defaults)
        self.detokenizer = Detokenizer(facts.tokenizer)
        self.metrics = ServerMetrics(facts.model_name)  # OpenAIServing replaces it with its own
        self.error: BaseException | None = None
        self.step_timeout: float | None = None  # sent to the core's watchdog by start()
        self.on_dead = None
        self.others: list[tuple] = []  # the other API server processes' pipe ends (spawn)
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        self._tickets: dict[int, tuple] = {}  # add ticket -> (stream, future, num_seqs)
        self._waiters: dict[int, asyncio.Future] = {}  # reset ticket -> future
        self._ticket = itertools.count()
        self._pending_seqs = 0
        self._gauges = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}
        self._sendq: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._threads = [threading.Thread(target=self._send_loop, name="jaxserve-core-send",
                                          daemon=True),
                         threading.Thread(target=self._receive_loop, name="jaxserve-core-recv",
                                          daemon=True)]

    @classmethod
    def launch(cls, config, log_level: int = logging.INFO, start_timeout: float = 3600.0,
               env: dict[str, str] | None = None, num_clients: int = 1) -> EngineCoreClient:
        """Spawn the core process with `config` (an EngineConfig) and wait until its engine is
        built; raises ValueError (bad model or option) or RuntimeError if it cannot start.
        env: variables set for the core process only (a data-parallel replica's devices);
        num_clients: API server processes it serves (see spawn)."""
        return cls.wait_ready(cls.spawn(config, log_level, env, num_clients), start_timeout)

    @staticmethod
    def spawn(config, log_level: int = logging.INFO, env: dict[str, str] | None = None,
              num_clients: int = 1) -> tuple:
        """Start the core process; wait_ready() it. Call from a thread that outlives the core:
        Linux's parent-death signal (engine_core._die_with_parent) follows the spawning thread.
        Returns (process, cmd_write, out_read, others): others are the (cmd_write, out_read)
        pipe ends of the num_clients - 1 other API server processes (attach())."""
        from jaxserve.engine_core import run_engine_core

        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX
        pipes = [(ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)) for _ in range(num_clients)]
        for (_, cmd_write), (_, out_write) in pipes:
            _widen(cmd_write)
            _widen(out_write)
        process = ctx.Process(target=run_engine_core, name="jaxserve-engine-core", daemon=True,
                              args=(config, [c[0] for c, _ in pipes], [o[1] for _, o in pipes],
                                    log_level))
        with _ENV_LOCK:  # spawn copies os.environ at start(): swap env in for that moment
            saved = {k: os.environ.get(k) for k in env or {}}
            os.environ.update(env or {})
            try:
                process.start()
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        for (cmd_read, _), (_, out_write) in pipes:
            cmd_read.close()  # ours closed: the core's death reads as EOF here
            out_write.close()
        logger.info("engine core process %d started", process.pid)
        others = [(c[1], o[0]) for c, o in pipes[1:]]
        return process, pipes[0][0][1], pipes[0][1][0], others

    @classmethod
    def attach(cls, pipes: tuple, start_timeout: float = 3600.0) -> EngineCoreClient:
        """The client of another API server process's core, over its (cmd_write, out_read)."""
        return cls.wait_ready((SharedCore(), *pipes, []), start_timeout)

    @classmethod
    def wait_ready(cls, spawned: tuple, start_timeout: float = 3600.0) -> EngineCoreClient:
        """The client of a spawn()ed core once its engine is built (raises as launch); its
        `others` keeps the other API servers' pipe ends (api_servers.py hands them out)."""
        process, cmd_write, out_read, others = spawned
        try:
            if not out_read.poll(start_timeout):
                process.kill()
                raise RuntimeError(f"the engine core did not start in {start_timeout}s")
            message = out_read.recv()
        except EOFError:  # it died without a word (a signal, a crash in native code)
            process.join(5)
            message = ("failed", False, f"the engine core exited (code {process.exitcode}) "
                                        "while starting")
        if message[0] == "failed":
            process.join(5)
            raise (ValueError if message[1] else RuntimeError)(message[2])
        client = cls(process, cmd_write, out_read, message[1])
        client.others = others
        return client

    # ---- the asyncio side (AsyncEngine's interface) --------------------------------------------
    def start(self) -> None:
        if self.step_timeout and not isinstance(self.process, SharedCore):  # one watchdog
            self._send(("watchdog", self.step_timeout))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the core to stop after its current step; wait up to `timeout`, then kill it."""
        self._stopping = True
        self._send(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    @property
    def running(self) -> bool:
        return self.process.is_alive()

    @property
    def num_unfinished(self) -> int:
        """Engine requests sent and not finished, failed or aborted (the DP router's load)."""
        return len(self._routes)

    def _queue_add(self, items: list[tuple[str, dict, SamplingParams]], stream: RequestStream,
                   fut: asyncio.Future) -> None:
        """Route the requests (their mirrors detokenize here) and send them to the core, whose
        acknowledgement settles `fut` (_on_applied); num_waiting counts them until then."""
        with self._lock:
            if self.error is not None:
                raise EngineDeadError(DEAD_MESSAGE)
            ticket = next(self._ticket)
            self._tickets[ticket] = (stream, fut, stream.num_seqs)
            self._pending_seqs += stream.num_seqs
            for rid, prompt, params in items:
                mirror = RequestMirror(rid, prompt, params, self.detokenizer, stream.arrival)
                self._routes[rid] = _Route(stream, mirror, stream.arrival)
        self._send(("add", items, stream.arrival, ticket))

    def abort(self, stream: RequestStream) -> None:
        """Abort the stream's requests (no-op for finished ones) in the core."""
        now = time.monotonic()
        with self._lock:
            if self.error is not None:
                return
            for rid in stream.request_ids:
                if self._routes.pop(rid, None) is not None:
                    self.metrics.on_finished(["abort"], now - stream.arrival)
        self._send(("abort", stream.request_ids))

    async def reset_prefix_cache(self) -> bool:
        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            if self.error is not None:
                raise EngineDeadError(DEAD_MESSAGE)
            ticket = next(self._ticket)
            self._waiters[ticket] = fut
        self._send(("reset", ticket))
        return await fut

    def _send(self, command: tuple) -> None:
        self._sendq.put(command)  # the sender thread writes: a full pipe never blocks the loop

    # ---- the threads ---------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            command = self._sendq.get()
            if command[0] == "stop" and isinstance(self.process, SharedCore):
                self._commands.close()  # hang up: the core's owner stops it
                return
            try:
                self._commands.send(command)
            except (OSError, ValueError):  # the core is gone: the receiver reports it
                return
            if command[0] == "stop":
                return

    def _receive_loop(self) -> None:
        try:
            while True:
                message = self._outputs.recv()
                kind = message[0]
                if kind == "step":
                    self._on_step(*message[1:])
                elif kind == "applied":
                    self._on_applied(*message[1:])
                elif kind == "reset":
                    fut = self._waiters.pop(message[1])
                    call_in_loop(fut.get_loop(), resolve_future, fut, None, message[2])
                else:
                    assert kind == "dead", kind
                    raise EOFError
        except (EOFError, OSError):
            if self._stopping:
                return
            self.process.join(5)
            code = self.process.exitcode
            logger.critical("the engine core process exited (code %s); failing every request",
                            code)
            self._die(RuntimeError(f"engine core exited with code {code}"))

    def _on_applied(self, acks: list[tuple], gauges: tuple) -> None:
        for ticket, error, param in acks:
            with self._lock:
                stream, fut, num_seqs = self._tickets.pop(ticket)
                self._pending_seqs -= num_seqs
                if error is not None:
                    for rid in stream.request_ids:
                        self._routes.pop(rid, None)
                else:
                    for rid in stream.request_ids:
                        route = self._routes.get(rid)
                        if route is not None:
                            self.metrics.on_prompt(len(route.mirror.prompt_token_ids))
            if error is not None:
                exc = ValueError(error)
                exc.param = param
            call_in_loop(stream.loop, resolve_future, fut, exc if error is not None else None)
        self._set_gauges(gauges)

    def _on_step(self, deltas: list[tuple], failed: list[str], gauges: tuple) -> None:
        now = time.monotonic()
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for delta in deltas:
                route = self._routes.get(delta[0])
                if route is None:  # aborted meanwhile
                    continue
                if self._observe(route, delta, now):
                    del self._routes[delta[0]]
                per_loop.setdefault(route.stream.loop, []).append((route, delta))
            dropped = [(rid, self._routes.pop(rid, None)) for rid in failed]
        for loop, items in per_loop.items():  # one wake-up per event loop per step
            call_in_loop(loop, _apply, items)
        for rid, route in dropped:
            if route is not None:
                self.metrics.on_finished(["abort"], now - route.arrival)
                call_in_loop(route.stream.loop, route.stream.fail, RequestFailedError(rid))
        self._set_gauges(gauges)

    def _observe(self, route: _Route, delta: tuple, now: float) -> bool:
        """Metrics for one request's delta; True when it finished the request."""
        if delta[2] is not None:  # the first tokens: queue and prefill time
            _, _, scheduled, route.first_token_time = delta[2]
            self.metrics.on_scheduled(scheduled - route.arrival,
                                      route.first_token_time - scheduled)
        num_new = sum(len(d[1]) for d in delta[1])
        if num_new:
            first = route.num_tokens == 0
            self.metrics.on_tokens(num_new, ttft=now - route.arrival if first else None,
                                   itl=None if first else now - route.last_token_time)
            route.num_tokens += num_new
            route.last_token_time = now
        route.finishes.update((d[0], d[2]) for d in delta[1] if d[2] is not None)
        done = len(route.finishes) == len(route.mirror.seqs)
        if done:
            self.metrics.on_finished(list(route.finishes.values()), now - route.arrival,
                                     decode=now - route.first_token_time)
        return done

    def _set_gauges(self, gauges: tuple) -> None:
        running, waiting, usage = gauges
        self._gauges = {"num_running": running, "num_waiting": waiting, "kv_cache_usage": usage}

    def _die(self, error: BaseException) -> None:
        """Fail every waiter with EngineDeadError, then tell on_dead (once)."""
        dead = EngineDeadError(DEAD_MESSAGE)
        with self._lock:
            if self.error is not None:
                return
            self.error = error
            tickets, self._tickets = self._tickets, {}
            waiters, self._waiters = self._waiters, {}
            streams = {id(r.stream): r.stream for r in self._routes.values()}
            self._routes.clear()
        for stream, fut, _ in tickets.values():
            call_in_loop(stream.loop, resolve_future, fut, dead)
            streams.pop(id(stream), None)
        for fut in waiters.values():
            call_in_loop(fut.get_loop(), resolve_future, fut, dead)
        for stream in streams.values():
            call_in_loop(stream.loop, stream.fail, dead)
        if self.on_dead is not None:
            self.on_dead()
