"""The engine core: LLMEngine's step loop in its own process, talking to the API server(s) over pipes.

API server k --("add" | "abort" | "reset" | "watchdog" | "stop")--> core: apply commands (answer
("applied", add acks, gauges) to k), step() --one ("step", deltas, failed, gauges) message per
step to each API server with news--> API server (server/core_client.py). With
`--api-server-count N` the core has N pipe pairs; each request's news goes to the API server that
added it, and one that hangs up (EOF) has its requests aborted,
which detokenizes, builds SSE chunks and JSON. The core sends token ids, never per-token text:
only sequences with stop strings are detokenized here (the stop check needs text), and their
text deltas ride along. Failure handling is the in-process AsyncEngine's: a step that raises fails
only its requests; a device error, MAX_FAILED_STEPS failures in a row, or a step past the
watchdog's limit sends ("dead",) and exits with EXIT_ENGINE_DEAD (vLLM V1's EngineCore design).
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass

from jaxserve.config import EngineConfig
from jaxserve.engine import LLMEngine
from jaxserve.input_processor import InputLimits
from jaxserve.request import Sequence

logger = logging.getLogger("jaxserve.core")

MAX_FAILED_STEPS = 3  # failed steps in a row that mean the engine itself is broken
EXIT_ENGINE_DEAD = 3  # the exit code of a dead engine (the server exits with it too)

# One sequence's news in one step:
#   (index, new_token_ids: list[int], finish_reason: str | None, stop_reason: int | str | None,
#    text: (start, str) | None (only with stop strings: the text is text[:start] + str now),
#    logprobs: tuple of 5 lists (token, logprob, rank, top_ids i32[k], top_logprobs f32[k]) | None)
SeqDelta = tuple
# One request's news in one step: (request_id, [SeqDelta], first: (num_cached_tokens,
# prompt_logprobs, scheduled_time, first_token_time) on the request's first message, else None);
# times are time.monotonic() (one clock for all processes of the machine).
RequestDelta = tuple


def is_device_error(error: BaseException) -> bool:
    """Errors after which the device state (KV cache, compiled steps) cannot be trusted."""
    if getattr(error, "device_error", False) or isinstance(error, MemoryError):
        return True
    return any(t.__name__ in ("XlaRuntimeError", "JaxRuntimeError") for t in type(error).__mro__)


@dataclass
class EngineFacts:
    """What the API server needs of the engine, sent once after start-up (pickled)."""

    model_name: str
    tokenizer: object
    chat_template: str | None
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    num_kv_pages: int
    config: EngineConfig
    limits: InputLimits
    sampling_defaults: dict
    supports_structured_outputs: bool
    startup_seconds: float

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineFacts:
        ip = engine.input_processor
        return cls(engine.model_name, engine.tokenizer, engine.chat_template,
                   tuple(engine.eos_token_ids), engine.max_model_len, engine.num_kv_pages,
                   engine.config, ip.limits, dict(ip.defaults),
                   bool(getattr(engine, "supports_structured_outputs", False)),
                   engine.startup_seconds)


def _logprob_columns(seq: Sequence, start: int) -> tuple | None:
    """The sequence's sampled-token logprob columns from `start` (SampleLogprobs' flat store)."""
    if seq.params.logprobs is None:
        return None
    s = seq.logprobs._store
    return (s.tokens[start:], s.logprobs[start:], s.ranks[start:], s.top_ids[start:],
            s.top_logprobs[start:])


class CoreEngine(LLMEngine):
    """LLMEngine whose step() returns RequestDeltas (token ids) instead of RequestOutputs (text):
    the API server process turns them into text."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._sent: dict[str, list[list[int]]] = {}  # request id -> per sequence [tokens, chars]
        self._scheduled: dict[str, float] = {}  # request id -> when a step first ran it
        self.scheduler.schedule = self._stamping(self.scheduler.schedule)

    def _stamping(self, schedule):
        """Wrap Scheduler.schedule to note when each request first runs (queue time metrics);
        only steps with prompt tokens can hold a new request, so decode steps cost nothing."""
        def stamped_schedule(*args, **kwargs):
            batch = schedule(*args, **kwargs)
            if batch is not None and batch.num_prefill_tokens:
                now = time.monotonic()
                for seq in batch.seqs:
                    self._scheduled.setdefault(seq.request_id, now)
            return batch
        return stamped_schedule

    def abort_request(self, request_id: str | list[str]) -> None:
        super().abort_request(request_id)
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            self._sent.pop(rid, None)
            self._scheduled.pop(rid, None)

    def _process_outputs(self, touched: list[Sequence]) -> list[RequestDelta]:
        """Per request, the tokens each touched sequence got since its last delta. Stop strings
        are checked here (on text), so only their sequences are detokenized."""
        now = time.monotonic()
        news: dict[str, list] = {}
        firsts: dict[str, tuple] = {}
        for seq in touched:
            state = self.output_processor.requests.get(seq.request_id)
            if state is None:
                continue
            sent = self._sent.get(seq.request_id)
            if sent is None:
                sent = self._sent[seq.request_id] = [[0, 0] for _ in state.seqs]
                first = state.seqs[0]
                plp = first.prompt_logprobs if state.params.prompt_logprobs is not None else None
                scheduled = self._scheduled.pop(seq.request_id, now)
                firsts[seq.request_id] = (first.num_cached_prompt_tokens, plp, scheduled, now)
                state.first_token_time = now
            text = None
            if seq.params.stop_strings:
                self.output_processor.detokenize(state, seq)  # may finish it ("stop")
                detok_text = state.detok[seq.index].text  # cut at a stop string: may shrink
                start = min(sent[seq.index][1], len(detok_text))
                text, sent[seq.index][1] = (start, detok_text[start:]), len(detok_text)
            start = sent[seq.index][0]
            sent[seq.index][0] = len(seq.output_token_ids)
            news.setdefault(seq.request_id, []).append(
                (seq.index, seq.output_token_ids[start:], seq.finish_reason, seq.stop_reason,
                 text, _logprob_columns(seq, start)))
        deltas = []
        for rid, seq_news in news.items():
            deltas.append((rid, seq_news, firsts.get(rid)))
            if self.output_processor.requests[rid].finished:
                del self.output_processor.requests[rid]
                del self._sent[rid]
        self.stats["generation_tokens"] += len(touched)
        return deltas


class EngineCore:
    """The core process's loop: read commands between steps, step, send one message per step to
    each API server (client) whose requests have news."""

    def __init__(self, engine: CoreEngine, commands, outputs):
        self.engine = engine
        # multiprocessing Connections, one per API server process (a lone one: that server's)
        self.commands = commands if isinstance(commands, list) else [commands]  # read ends
        self.outputs = outputs if isinstance(outputs, list) else [outputs]  # write ends
        self._live = set(range(len(self.commands)))  # clients that have not hung up
        self._owner: dict[str, int] = {}  # request id -> the client that added it
        # Messages leave through one sender thread: pickling a step's deltas and writing them
        # into the pipes (which block while an API process is behind in reading) stay off the
        # step loop, so a busy API process never stalls the device. One queue keeps the order;
        # with several API servers, one that falls 1 MiB (PIPE_BYTES) behind delays the others.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="jaxserve-core-sender",
                                        daemon=True)
        self._sender.start()
        self._failed_steps = 0
        self._step_started: float | None = None
        self._sent_gauges: tuple | None = None  # those of the last "step" message
        self.fanout = None  # multi-host: followers replay each command and step (distributed.py)

    def send(self, message: tuple, client: int | None = 0) -> None:
        """Queue a message for API server `client` (None: every one); returns at once."""
        self._outbox.put((client, message))

    def _send_loop(self) -> None:
        gone: set[int] = set()
        while (item := self._outbox.get()) is not None:
            client, message = item
            for k in range(len(self.outputs)) if client is None else (client,):
                if k in gone:
                    continue
                try:
                    self.outputs[k].send(message)
                except (OSError, ValueError):  # that API server is gone: nobody to tell
                    gone.add(k)

    def flush(self, timeout: float | None = None) -> None:
        """Send what is queued, then stop the sender thread."""
        self._outbox.put(None)
        self._sender.join(timeout)

    def run(self) -> None:
        """Until "stop" or every API server goes away (EOF); raises when the engine is broken."""
        while self._read_commands(block=not self.engine.has_unfinished_requests()):
            if self.engine.has_unfinished_requests():
                self._step()

    def _read_commands(self, block: bool) -> bool:
        """Apply what every client sent; False on "stop" or once no client is left."""
        live = [self.commands[k] for k in sorted(self._live)]
        ready = multiprocessing.connection.wait(live, None if block else 0)
        for k in sorted(self._live):
            if self.commands[k] in ready and not self._read_client(k):
                return False
        return bool(self._live)

    def _read_client(self, client: int) -> bool:
        acks, applied = [], False
        connection = self.commands[client]
        try:
            while connection.poll(0):
                command = connection.recv()
                if command[0] == "stop":
                    return False
                ack = self._apply(command, client)
                applied = True
                if ack is not None:
                    acks.append(ack)
        except (EOFError, OSError):
            self._hang_up(client)
        if applied:  # acks now (a step may take long); gauges change with adds and aborts
            self.send(("applied", acks, self._gauges()), client)
        return True

    def _hang_up(self, client: int) -> None:
        """API server `client` is gone: nobody reads its requests any more, abort them."""
        self._live.discard(client)
        orphans = [rid for rid, k in self._owner.items() if k == client]
        if orphans:
            self.engine.abort_request(orphans)
        for rid in orphans:
            del self._owner[rid]
        logger.info("API server %d is gone (%d requests aborted); %d left", client,
                    len(orphans), len(self._live))

    def _apply(self, command: tuple, client: int = 0) -> tuple | None:
        if self.fanout is not None:
            self.fanout.send(command)
        kind = command[0]
        if kind == "abort":
            self.engine.abort_request(command[1])
            for rid in command[1]:
                self._owner.pop(rid, None)
        elif kind == "reset":
            self.send(("reset", command[1], self.engine.reset_prefix_cache()), client)
        elif kind == "watchdog":
            threading.Thread(target=self._watch, args=(command[1],), name="jaxserve-watchdog",
                             daemon=True).start()
        else:
            assert kind == "add", command
            return self._add(*command[1:], client=client)
        return None

    def _add(self, items: list, arrival: float, ticket: int, client: int = 0) -> tuple:
        """All of one HTTP request's engine requests, or none: (ticket, error, param)."""
        added = []
        try:
            for rid, prompt, params in items:
                self.engine.add_request(rid, prompt, params, arrival_time=arrival)
                added.append(rid)
                self._owner[rid] = client
        except ValueError as e:  # the handler answers 400
            self.engine.abort_request(added)
            for rid in added:
                del self._owner[rid]
            return ticket, str(e), getattr(e, "param", None)
        return ticket, None, None

    def _step(self) -> None:
        if self.fanout is not None:
            self.fanout.send(("step",))
        self._step_started = time.monotonic()
        try:
            deltas = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the step's requests, keep serving
            self._step_started = None
            self._send_step([], self._recover(e), self._gauges())
            return
        self._step_started = None
        self._failed_steps = 0
        gauges = self._gauges()
        if deltas or gauges != self._sent_gauges:  # not while requests wait for free pages
            self._send_step(deltas, [], gauges)
            self._sent_gauges = gauges

    def _send_step(self, deltas: list, failed: list[str], gauges: tuple) -> None:
        """One "step" message per client with news: its requests' deltas and failures, and the
        gauges (every client, when they changed). Finished and failed requests leave the owner
        table."""
        if len(self.outputs) == 1:
            self.send(("step", deltas, failed, gauges))
        else:
            per_client = {k: ([], []) for k in self._live}
            for delta in deltas:
                per_client.setdefault(self._owner.get(delta[0], 0), ([], []))[0].append(delta)
            for rid in failed:
                per_client.setdefault(self._owner.get(rid, 0), ([], []))[1].append(rid)
            changed = gauges != self._sent_gauges
            for k, (mine, lost) in per_client.items():
                if mine or lost or changed:
                    self.send(("step", mine, lost, gauges), k)
        requests = self.engine.output_processor.requests
        for rid in [d[0] for d in deltas if d[0] not in requests] + failed:
            self._owner.pop(rid, None)

    def _recover(self, error: Exception) -> list[str]:
        """Abort the requests the failed step ran (freeing their pages) and return their ids;
        re-raise (killing the core) when the engine itself looks broken."""
        self._failed_steps += 1
        if is_device_error(error) or self._failed_steps >= MAX_FAILED_STEPS:
            raise error
        sched = self.engine.scheduler
        waiting = {s.request_id for s in sched.waiting}
        running = {s.request_id for s in sched.running}
        requests = self.engine.output_processor.requests
        failed = [rid for rid in requests if rid in running or rid not in waiting]
        logger.error("engine step failed (%d in a row); aborting its requests %s",
                     self._failed_steps, failed, exc_info=error)
        self.engine.abort_request(failed)
        return failed

    def _gauges(self) -> tuple[int, int, float]:
        sched = self.engine.scheduler
        return sched.num_running, sched.num_waiting, float(sched.kv_cache_usage)

    def _watch(self, step_timeout: float) -> None:
        """A step running longer than step_timeout means a hung device: report and exit."""
        while True:
            time.sleep(min(1.0, step_timeout / 4))
            started = self._step_started
            if started is not None and time.monotonic() - started > step_timeout:
                logger.error("an engine step has not returned in %.1fs (--step-timeout): "
                             "the device is hung", time.monotonic() - started)
                self.die()

    def die(self) -> None:
        """Tell the API server (best effort) and leave at once: a thread may be stuck in a
        device call, and interpreter shutdown under it aborts the process."""
        self.send(("dead",), None)
        self.flush(timeout=5.0)  # the sender may be blocked on a reader that is gone
        logging.shutdown()
        os._exit(EXIT_ENGINE_DEAD)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the API server dies, even mid-step (prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_engine_core(config: EngineConfig, commands: list, outputs: list, log_level: int) -> None:
    """The core process's entry point (multiprocessing spawn target); commands and outputs: one
    pipe end each per API server process."""
    _die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the API server drains, then stops us
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        from jaxserve import distributed
        from jaxserve.server import faults

        multihost = distributed.DistributedConfig.from_env(torchrun=False)  # set by the CLI
        distributed.initialize(multihost)
        engine = CoreEngine(config)
        faults.install_from_env(engine)  # a no-op unless JAXSERVE_FAULT_INJECT is set
    except Exception as e:  # noqa: BLE001 - the API server reports it and exits
        logger.debug("engine start-up failed", exc_info=True)
        failed = ("failed", isinstance(e, ValueError), f"{type(e).__name__}: {e}"
                  if not isinstance(e, ValueError) else str(e))
        for connection in outputs:
            with contextlib.suppress(OSError):  # an API server process that is gone already
                connection.send(failed)
        return
    core = EngineCore(engine, commands, outputs)
    if multihost is not None:
        core.fanout = distributed.CommandFanout.accept(multihost)
    core.send(("ready", EngineFacts.of(engine)), None)
    try:
        core.run()
    except BaseException:  # noqa: BLE001 - a broken engine: the server fails every request
        logger.exception("the engine is broken; the engine core exits")
        core.die()
    core.flush(timeout=5.0)
    if multihost is not None:  # the followers see EOF; leave jax.distributed together
        distributed.shutdown(core.fanout)
