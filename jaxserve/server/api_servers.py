"""`--api-server-count N`: N API server processes on one host:port in front of one engine core.

serve() (API server 0) binds host:port with SO_REUSEPORT, starts the engine core(s) with N pipe
pairs each, then spawns API servers 1..N-1 (run_api_server): each binds the same port (the kernel
spreads new connections over the N listening sockets), attaches to its pipe pair of every core
and serves with its own event loop, tokenizer, detokenizer and SSE. The core sends each request's
tokens to the API server that added it (request ids are uuid4-based: unique across processes).
/metrics: each process shares its counters through a temporary directory (ServerMetrics.share);
a scrape of any one adds the others' (at most 1 s old). Lifetimes:
- the core dies: every API server fails its open streams (an error event) and exits 3; server 0
  waits for the others, then exits 3 too.
- an API server process dies: its connections are lost and the core aborts its requests; server
  0 drains the others as on SIGTERM (their in-flight requests finish) and exits 1.
- SIGTERM/SIGINT to server 0 is forwarded: every API server drains, then server 0 stops the core.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time

from jaxserve.engine_core import EXIT_ENGINE_DEAD

logger = logging.getLogger("jaxserve.server")

EXIT_API_SERVER_DIED = 1  # server 0's exit code after another API server process died


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port that other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def client_pipes(engine, index: int) -> list[tuple]:
    """API server `index`'s (cmd_write, out_read) of each core of `engine` (one EngineCoreClient
    or a DataParallelClient's replicas)."""
    replicas = getattr(engine, "replicas", [engine])
    return [replica.others[index - 1] for replica in replicas]


class ApiServers:
    """Server 0's handle on API servers 1..N-1: start, forward signals, watch, wait."""

    def __init__(self, args, port: int, engine, log_level: int, metrics_dir: str):
        ctx = multiprocessing.get_context("spawn")
        count = args.api_server_count
        pipes = [ctx.Pipe(duplex=False) for _ in range(1, count)]  # "listening" from each
        self.ready = [read for read, _ in pipes]
        # Each one's ends of the core pipes: once it has them, ours must close, or a dead
        # server would never read as EOF to the core (nor stop blocking its sender thread).
        self._handed = [[*pipes[i - 1][1:], *(end for pair in client_pipes(engine, i)
                                              for end in pair)] for i in range(1, count)]
        self.processes = [ctx.Process(target=run_api_server, name=f"jaxserve-api-server-{i}",
                                      args=(args, (metrics_dir, i), port,
                                            client_pipes(engine, i), log_level, pipes[i - 1][1]))
                          for i in range(1, count)]
        self.stopping = False
        self.died: list[tuple[int, int | None]] = []  # (index, exit code) of unexpected deaths

    def start(self, timeout: float = 600.0) -> None:
        """Start them and wait until each listens; RuntimeError naming one that did not."""
        for process, handed in zip(self.processes, self._handed):
            process.start()
            for end in handed:
                end.close()
        deadline = time.monotonic() + timeout
        for i, (process, ready) in enumerate(zip(self.processes, self.ready), start=1):
            try:
                if not ready.poll(max(0.0, deadline - time.monotonic())):
                    raise EOFError
                ready.recv()
            except EOFError:  # it exited (or hung) before listening
                self.kill()
                raise RuntimeError(f"API server process {i} did not start (exit code "
                                   f"{process.exitcode})") from None
        logger.info("%d more API server processes serve: pids %s", len(self.processes),
                    [p.pid for p in self.processes])

    def watch(self, on_death) -> None:
        """Call on_death(index, exit code) from a thread when one exits while we are not
        stopping (an engine-dead exit is left to server 0's own engine client)."""

        def wait(i: int, process) -> None:
            process.join()
            if not self.stopping and process.exitcode != EXIT_ENGINE_DEAD:
                self.died.append((i, process.exitcode))
                on_death(i, process.exitcode)

        for i, process in enumerate(self.processes, start=1):
            threading.Thread(target=wait, args=(i, process), daemon=True,
                             name=f"jaxserve-watch-api-{i}").start()

    def signal(self, sig: int) -> None:
        """Forward SIGTERM/SIGINT: they drain (exits from now on are expected)."""
        self.stopping = True
        for process in self.processes:
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):  # it exited just now
                    os.kill(process.pid, sig)

    def wait(self, timeout: float) -> None:
        """Let them finish (drain, fail their streams), then kill what is left."""
        self.stopping = True
        for process in self.processes:
            process.join(timeout)
        self.kill()

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def run_api_server(args, shared: tuple[str, int], port: int, pipes: list[tuple], log_level: int,
                   ready) -> None:
    """API server process shared[1] (multiprocessing spawn target): serve until drained or the
    engine is dead; exits as server 0 would (0, or 3 once the engine died). shared: (metrics
    directory, index); ready: a pipe end told once it listens."""
    index = shared[1]
    from jaxserve.engine_core import _die_with_parent
    from jaxserve.server import cli
    from jaxserve.server.core_client import EngineCoreClient

    os.setpgrp()  # a terminal's Ctrl-C reaches server 0 only, which forwards it once
    _die_with_parent()
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(name)s[api-server-{index}] "
                                                "%(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: cli._exit_now(0))  # until uvicorn takes over
    sock = bind_socket(args.host, port)
    clients = [EngineCoreClient.attach(p) for p in pipes]
    if len(clients) == 1:
        engine = clients[0]
    else:
        from jaxserve.server.dp_router import DataParallelClient

        engine = DataParallelClient(clients)
    cli.serve_app(engine, args, sock, shared=shared, on_started=lambda: ready.send("listening"))
