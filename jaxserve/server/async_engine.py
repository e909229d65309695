"""AsyncEngine: one thread steps the LLMEngine in the server's process (`--engine-in-process`).

handler --add/abort--> inbox (lock) --engine thread: apply commands, step()--> call_soon_threadsafe
--> the handler's RequestStream (coalescing). The default server runs the engine in its own
process instead (engine_core.py, core_client.py: the same interface). The HTTP side only ever
holds the lock to append to the inbox. A step that raises fails only the requests it was running
(500 internal_error) and the thread keeps serving; a device error, MAX_FAILED_STEPS failures in a
row, or a step that outlives `step_timeout` (the watchdog) marks the engine dead and calls
`on_dead` (the CLI exits non-zero).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from jaxserve.engine_core import MAX_FAILED_STEPS, is_device_error
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.metrics import ServerMetrics

logger = logging.getLogger("jaxserve.server")
DEAD_MESSAGE = "the engine failed (internal error) and the server is restarting; retry later"


class EngineDeadError(RuntimeError):
    """The engine is broken; every in-flight and later request fails with this. The message
    never carries internal exception text (the log has it)."""

    code = "engine_dead"


class RequestFailedError(EngineDeadError):
    """A step failed while running this request: it was aborted, the engine keeps serving. A
    subclass so that every place failing a request on a dead engine fails this one alike."""

    code = "internal_error"

    def __init__(self, request_id: str):
        super().__init__(f"internal error while generating request {request_id}; it was "
                         "aborted (the server log has the details)")


@dataclass
class _Track:
    """Engine-thread bookkeeping for one engine request (metrics only)."""

    arrival: float
    num_tokens: int = 0
    last_token_time: float = 0.0


class RequestStream:
    """One HTTP request's engine requests; iterate to get their cumulative RequestOutputs.

    Coalescing: the engine side push()es each request's latest news (a RequestOutput, or a
    RequestMirror that builds one) and the iterator takes whatever is there when it resumes, so a
    client that falls behind gets one output covering several steps, never a growing queue.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, request_ids: list[str]):
        self.loop = loop
        self.request_ids = request_ids
        self.arrival = time.monotonic()
        self.num_seqs = 0
        self.final_only = False  # yield finished outputs only (non-streaming responses)
        self._news: dict[str, object] = {}  # request id -> RequestOutput | RequestMirror
        self._error: BaseException | None = None
        self._wake = asyncio.Event()

    def push(self, request_id: str, news) -> None:
        """Event loop thread: the request's latest RequestOutput, or its updated mirror."""
        self._news[request_id] = news
        self._wake.set()

    def fail(self, error: BaseException) -> None:
        """Event loop thread: end the iteration with `error` (after the news already pushed)."""
        if self._error is None:
            self._error = error
        self._wake.set()

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        unfinished = set(self.request_ids)
        while unfinished:
            self._wake.clear()
            news, self._news = self._news, {}
            for rid, item in news.items():
                if not isinstance(item, RequestOutput):  # a mirror: detokenize now
                    if self.final_only and not item.finished:
                        continue
                    item = item.output()
                if item.finished:
                    unfinished.discard(rid)
                elif self.final_only:
                    continue
                yield item
            if self._error is not None:
                raise self._error
            if unfinished:
                await self._wake.wait()


def resolve_future(fut: asyncio.Future, error: BaseException | None, result=None) -> None:
    """Event loop thread: settle `fut` with `result` or `error` (no-op if it is done)."""
    if fut.done():  # the handler was cancelled meanwhile (client gone)
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _deliver(items: list[tuple[RequestStream, object]]) -> None:
    """Event loop thread: a RequestOutput is pushed, an exception fails the stream."""
    for stream, item in items:
        if isinstance(item, BaseException):
            stream.fail(item)
        else:
            stream.push(item.request_id, item)


def call_in_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


class EngineFrontend:
    """What OpenAIServing holds of an engine, shared by AsyncEngine (engine thread in this process)
    and core_client.EngineCoreClient (engine in its own process). A subclass keeps `_gauges`
    (refreshed after each step), `_pending_seqs` (sequences queued but not yet in the
    scheduler), and defines `_queue_add(items, stream, fut)` (hand an add to the engine, which
    settles `fut`) and `abort(stream)`."""

    _gauges: dict[str, float]
    _pending_seqs: int

    @property
    def gauges(self) -> dict[str, float]:
        """num_running, num_waiting, kv_cache_usage as of the end of the last step."""
        return self._gauges

    @property
    def num_waiting(self) -> int:
        """Sequences waiting in the scheduler plus those queued and not yet added to it."""
        return int(self._gauges["num_waiting"]) + self._pending_seqs

    async def add(self, items: list[tuple[str, dict, SamplingParams]]) -> RequestStream:
        """Queue engine requests (id, prompt, params) atomically; raises the engine's ValueError."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(loop, [rid for rid, _, _ in items])
        stream.num_seqs = sum(params.n for _, _, params in items)
        fut = loop.create_future()
        self._queue_add(items, stream, fut)
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(stream)
            raise
        return stream


class AsyncEngine(EngineFrontend):
    """Runs `engine.step()` continuously in a daemon thread, sleeping while there is no work."""

    def __init__(self, engine, metrics: ServerMetrics):
        from jaxserve.server import faults

        faults.install_from_env(engine)  # a no-op unless JAXSERVE_FAULT_INJECT is set
        self.engine = engine
        self.metrics = metrics
        self.error: BaseException | None = None
        self.step_timeout: float | None = None  # seconds; the watchdog declares a hung step dead
        self.on_dead = None  # called once (from the dying thread) when the engine is dead
        self._step_started: float | None = None  # monotonic start of the step now running
        self._failed_steps = 0  # in a row
        self._cond = threading.Condition(threading.Lock())
        self._inbox: list[tuple] = []
        self._pending_seqs = 0  # sequences in not-yet-applied add commands
        self._stopping = False
        self._routes: dict[str, RequestStream] = {}  # engine thread only
        self._tracks: dict[str, _Track] = {}  # engine thread only
        self._gauges = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)

    # ---- the asyncio side ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self.step_timeout:
            threading.Thread(target=self._watch, name="jaxserve-watchdog", daemon=True).start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the engine thread to stop after its current step; wait up to `timeout`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive() and self.error is None:  # a dead one may be stuck for good
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive (it may be stuck in a step after stop())."""
        return self._thread.is_alive()

    def _queue_add(self, items: list[tuple[str, dict, SamplingParams]], stream: RequestStream,
                   fut: asyncio.Future) -> None:
        self._submit(("add", items, stream, fut), stream.num_seqs)

    def abort(self, stream: RequestStream) -> None:
        """Abort all of the stream's requests (no-op for finished ones); frees their pages."""
        self._submit(("abort", stream.request_ids), 0)

    async def reset_prefix_cache(self) -> bool:
        """Forget cached pages between requests (the engine thread does it); False while any run."""
        fut = asyncio.get_running_loop().create_future()
        self._submit(("reset", fut), 0)
        return await fut

    def _submit(self, command: tuple, num_seqs: int) -> None:
        with self._cond:
            if self.error is not None:
                raise EngineDeadError(DEAD_MESSAGE)
            self._inbox.append(command)
            self._pending_seqs += num_seqs
            self._cond.notify()

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (commands := self._take_commands()) is not None:
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    self._step()
                self._snapshot()
        except BaseException as e:  # noqa: BLE001 - a dead engine must fail every waiter
            logger.exception("the engine is broken; failing every request")
            self._die(e)

    def _step(self) -> None:
        self._step_started = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the step's requests, keep serving
            self._step_started = None
            if self.error is not None:  # the watchdog gave up on this step meanwhile
                raise
            self._recover(e)
            return
        self._step_started = None
        if self.error is not None:  # the watchdog gave up on this step meanwhile
            raise EngineDeadError(DEAD_MESSAGE)
        self._failed_steps = 0
        self._publish(outputs)

    def _recover(self, error: Exception) -> None:
        """Abort the requests the failed step was running (freeing their pages) and fail them
        with a 500; re-raise (killing the engine) when the engine itself looks broken."""
        self._failed_steps += 1
        if is_device_error(error) or self._failed_steps >= MAX_FAILED_STEPS:
            raise error
        failed = self._step_request_ids()
        logger.error("engine step failed (%d in a row); aborting its requests %s",
                     self._failed_steps, failed, exc_info=error)
        self.engine.abort_request(failed)
        now = time.monotonic()
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid in failed:
            stream = self._routes.pop(rid)
            track = self._tracks.pop(rid, None)
            if track is not None:
                self.metrics.on_finished(["abort"], now - track.arrival)
            per_loop.setdefault(stream.loop, []).append((stream, RequestFailedError(rid)))
        for loop, items in per_loop.items():
            call_in_loop(loop, _deliver, items)

    def _step_request_ids(self) -> list[str]:
        """Requests the failed step touched: all but those whose sequences all still wait (a
        request already finished but not yet reported counts as touched)."""
        sched = self.engine.scheduler
        running = {s.request_id for s in sched.running}
        waiting = {s.request_id for s in sched.waiting}
        return [rid for rid in self._routes if rid in running or rid not in waiting]

    def _watch(self) -> None:
        """Watchdog: a step running longer than step_timeout means a hung device."""
        while not self._stopping and self.error is None:
            time.sleep(min(1.0, self.step_timeout / 4))
            started = self._step_started
            if started is not None and time.monotonic() - started > self.step_timeout:
                logger.error("an engine step has not returned in %.1fs (--step-timeout): "
                             "the device is hung", time.monotonic() - started)
                self._die(TimeoutError(f"engine step exceeded {self.step_timeout}s"))
                return

    def _take_commands(self) -> list[tuple] | None:
        with self._cond:
            while not (self._inbox or self._stopping or self.engine.has_unfinished_requests()):
                self._cond.wait()
            if self._stopping or self.error is not None:
                return None
            commands, self._inbox = self._inbox, []
            return commands

    def _apply(self, command: tuple) -> None:
        if command[0] == "reset":
            fut, cleared = command[1], self.engine.reset_prefix_cache()
            call_in_loop(fut.get_loop(), resolve_future, fut, None, cleared)
            return
        if command[0] == "abort":
            self.engine.abort_request(command[1])
            now = time.monotonic()
            for rid in command[1]:
                self._routes.pop(rid, None)
                track = self._tracks.pop(rid, None)
                if track is not None:  # it was still running: count it as aborted
                    self.metrics.on_finished(["abort"], now - track.arrival)
            return
        _, items, stream, fut = command
        added: list[str] = []
        error = None
        try:
            for rid, prompt, params in items:
                self.engine.add_request(rid, prompt, params, arrival_time=stream.arrival)
                added.append(rid)
        except Exception as e:  # noqa: BLE001 - handed to the handler (ValueError -> 400)
            self.engine.abort_request(added)
            error = e
        with self._cond:
            self._pending_seqs -= stream.num_seqs
        if error is None:
            for rid, prompt, _ in items:
                self._routes[rid] = stream
                self._tracks[rid] = _Track(stream.arrival)
                self.metrics.on_prompt(len(prompt["prompt_token_ids"]))
        call_in_loop(stream.loop, resolve_future, fut, error)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._routes.get(out.request_id)
            if stream is None:
                continue
            self._observe(out, now)
            per_loop.setdefault(stream.loop, []).append((stream, out))
            if out.finished:
                del self._routes[out.request_id]
        for loop, items in per_loop.items():  # one wake-up per event loop per step
            call_in_loop(loop, _deliver, items)

    def _observe(self, out: RequestOutput, now: float) -> None:
        track = self._tracks[out.request_id]
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        if num_tokens > track.num_tokens:
            first = track.num_tokens == 0
            self.metrics.on_tokens(num_tokens - track.num_tokens,
                                   ttft=now - track.arrival if first else None,
                                   itl=None if first else now - track.last_token_time)
            track.num_tokens, track.last_token_time = num_tokens, now
        if out.finished:
            del self._tracks[out.request_id]
            self.metrics.on_finished([c.finish_reason or "abort" for c in out.outputs],
                                     now - track.arrival)

    def _snapshot(self) -> None:
        sched = self.engine.scheduler
        self._gauges = {"num_running": sched.num_running, "num_waiting": sched.num_waiting,
                        "kv_cache_usage": float(sched.kv_cache_usage)}

    def _die(self, error: BaseException) -> None:
        """Fail every waiter with EngineDeadError, then tell on_dead (once)."""
        dead = EngineDeadError(DEAD_MESSAGE)
        with self._cond:
            if self.error is not None:
                return
            self.error = error
            commands, self._inbox = self._inbox, []
        for command in commands:
            if command[0] == "add":
                call_in_loop(command[2].loop, resolve_future, command[3], dead)
        for stream in set(self._routes.values()):
            call_in_loop(stream.loop, stream.fail, dead)
        self._routes.clear()
        if self.on_dead is not None:
            self.on_dead()
