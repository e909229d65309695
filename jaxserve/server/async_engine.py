"""AsyncEngine: one thread steps the LLMEngine; asyncio handlers talk to it through an inbox.

handler --add/abort--> inbox (lock) --engine thread: apply commands, step()--> call_soon_threadsafe
--> the handler's asyncio.Queue. The HTTP side only ever holds the lock to append to the inbox.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.metrics import ServerMetrics

logger = logging.getLogger("jaxserve.server")


class EngineDeadError(RuntimeError):
    """The engine thread crashed; every in-flight and later request fails with this."""


@dataclass
class _Track:
    """Engine-thread bookkeeping for one engine request (metrics only)."""

    arrival: float
    num_tokens: int = 0
    last_token_time: float = 0.0


class RequestStream:
    """One HTTP request's engine requests; iterate to get their cumulative RequestOutputs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_ids: list[str]):
        self.loop = loop
        self.request_ids = request_ids
        self.arrival = time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.num_seqs = 0

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        unfinished = set(self.request_ids)
        while unfinished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                unfinished.discard(item.request_id)
            yield item


def _resolve(fut: asyncio.Future, error: BaseException | None, result=None) -> None:
    if fut.done():  # the handler was cancelled meanwhile (client gone)
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


class AsyncEngine:
    """Runs `engine.step()` continuously in a daemon thread, sleeping while there is no work."""

    def __init__(self, engine, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self.error: BaseException | None = None
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

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def gauges(self) -> dict[str, float]:
        """num_running, num_waiting, kv_cache_usage as of the end of the last step."""
        return self._gauges

    @property
    def num_waiting(self) -> int:
        """Sequences waiting in the scheduler plus those still in the inbox."""
        return int(self._gauges["num_waiting"]) + self._pending_seqs

    async def add(self, items: list[tuple[str, dict, SamplingParams]]) -> RequestStream:
        """Queue engine requests (id, prompt, params) atomically; raises the engine's ValueError."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(loop, [rid for rid, _, _ in items])
        stream.num_seqs = sum(params.n for _, _, params in items)
        fut = loop.create_future()
        self._submit(("add", items, stream, fut), stream.num_seqs)
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(stream)
            raise
        return stream

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
                raise EngineDeadError(f"the engine thread died: {self.error!r}")
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
                    self._publish(self.engine.step())
                self._snapshot()
        except BaseException as e:  # noqa: BLE001 - a dead engine must fail every waiter
            logger.exception("engine thread crashed")
            self._die(e)

    def _take_commands(self) -> list[tuple] | None:
        with self._cond:
            while not (self._inbox or self._stopping or self.engine.has_unfinished_requests()):
                self._cond.wait()
            if self._stopping:
                return None
            commands, self._inbox = self._inbox, []
            return commands

    def _apply(self, command: tuple) -> None:
        if command[0] == "reset":
            fut = command[1]
            _call_in_loop(fut.get_loop(), _resolve, fut, None, self.engine.reset_prefix_cache())
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
        _call_in_loop(stream.loop, _resolve, fut, error)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._routes.get(out.request_id)
            if stream is None:
                continue
            self._observe(out, now)
            per_loop.setdefault(stream.loop, []).append((stream.queue, out))
            if out.finished:
                del self._routes[out.request_id]
        for loop, items in per_loop.items():  # one wake-up per event loop per step
            _call_in_loop(loop, _deliver, items)

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
        dead = EngineDeadError(f"the engine thread died: {error!r}")
        with self._cond:
            self.error = error
            commands, self._inbox = self._inbox, []
        for command in commands:
            if command[0] == "add":
                _call_in_loop(command[2].loop, _resolve, command[3], dead)
        for stream in set(self._routes.values()):
            _call_in_loop(stream.loop, _deliver, [(stream.queue, dead)])
        self._routes.clear()
