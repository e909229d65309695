"""Data parallelism (`--data-parallel-size N`): N engine-core processes behind one API server.

handler --add--> DataParallelClient: the live replica with the fewest unfinished engine requests
(ties: round-robin) --> that replica's EngineCoreClient --pipe--> its core process, pinned to its
own tensor_parallel_size devices (CUDA_VISIBLE_DEVICES, replica_env). Each replica detokenizes
and fails its own requests; the router only picks, aggregates and watches:
- a replica whose core dies fails its in-flight requests (EngineDeadError, as a lone core does)
  and leaves the rotation; the server keeps serving on the others. A request the dead replica
  had not acknowledged yet is re-sent to another one (nothing was generated for it).
- when no replica is left, `on_dead` runs (the CLI exits with EXIT_ENGINE_DEAD = 3, as vLLM's
  API server exits when its engines are gone).
- /metrics: one ServerMetrics shared by all replicas (counters and histograms add up); gauges
  are sums over live replicas, kv_cache_usage their mean. /v1/models: the one model.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import weakref

from jaxserve.server.async_engine import DEAD_MESSAGE, EngineDeadError, RequestFailedError
from jaxserve.server.core_client import EngineCoreClient

logger = logging.getLogger("jaxserve.server")


def replica_env(rank: int, tensor_parallel_size: int, environ=None) -> dict[str, str]:
    """The environment of replica `rank`'s core process: its tensor_parallel_size GPUs, taken in
    order from CUDA_VISIBLE_DEVICES (or 0, 1, ... when unset). Under JAX_PLATFORMS=cpu only the
    rank (the replicas are separate processes on the host's CPU)."""
    environ = os.environ if environ is None else environ
    env = {"JAXSERVE_DP_RANK": str(rank)}
    if environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return env
    tp = tensor_parallel_size
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = ([i.strip() for i in visible.split(",") if i.strip()] if visible
           else [str(i) for i in range((rank + 1) * tp)])
    mine = ids[rank * tp:(rank + 1) * tp]
    if len(mine) < tp:
        raise ValueError(f"data-parallel replica {rank} needs tensor_parallel_size={tp} devices "
                         f"but CUDA_VISIBLE_DEVICES={visible!r} lists {len(ids)}")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return env


class DataParallelClient:
    """EngineCoreClient's interface over several of them (OpenAIServing holds either)."""

    def __init__(self, replicas: list[EngineCoreClient]):
        if not replicas:
            raise ValueError("DataParallelClient needs at least one replica, got 0")
        self.replicas = replicas
        first = replicas[0]
        # What OpenAIServing reads of an engine (the replicas load the same model and options):
        self.model_name, self.tokenizer = first.model_name, first.tokenizer
        self.chat_template, self.eos_token_ids = first.chat_template, first.eos_token_ids
        self.max_model_len, self.num_kv_pages = first.max_model_len, first.num_kv_pages
        self.config = dataclasses.replace(first.config, data_parallel_size=len(replicas))
        self.startup_seconds = max(r.startup_seconds for r in replicas)
        self.supports_structured_outputs = first.supports_structured_outputs
        self.input_processor, self.detokenizer = first.input_processor, first.detokenizer
        self.error: BaseException | None = None  # set once no replica is left
        self.step_timeout: float | None = None
        self.on_dead = None
        self._lock = threading.Lock()
        self._live = list(range(len(replicas)))
        self._next = itertools.count()  # round-robin among the least loaded
        self._owner: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # stream -> rank
        self.routed = [0] * len(replicas)  # HTTP requests sent to each replica (logs, tests)

    @classmethod
    def launch(cls, config, log_level: int = logging.INFO, start_timeout: float = 3600.0,
               environ=None, num_clients: int = 1) -> DataParallelClient:
        """Start config.data_parallel_size core processes at once (from this thread: their
        parent-death signal follows it), each with data_parallel_size=1 on its own devices; if
        one cannot start, stop the others and raise its error (ValueError: bad model or option).
        num_clients: API server processes each core serves (--api-server-count)."""
        size = config.data_parallel_size
        one = dataclasses.replace(config, data_parallel_size=1)
        envs = [replica_env(rank, config.tensor_parallel_size, environ) for rank in range(size)]
        spawned = [EngineCoreClient.spawn(one, log_level, env, num_clients) for env in envs]
        started, errors = [], []
        for item in spawned:  # they build their engines in parallel; collect them in order
            try:
                started.append(EngineCoreClient.wait_ready(item, start_timeout))
            except (ValueError, RuntimeError) as e:
                errors.append(e)
                item[0].kill()
        if errors:
            for client in started:
                client.stop()
            for item in spawned:
                item[0].kill()
            raise errors[0]
        for rank, client in enumerate(started):
            logger.info("data-parallel replica %d: engine core process %d (%s)", rank,
                        client.process.pid, envs[rank])
        return cls(started)

    # ---- what OpenAIServing and the CLI call ---------------------------------------------------
    @property
    def metrics(self):
        return self.replicas[0].metrics

    @metrics.setter
    def metrics(self, metrics) -> None:
        for client in self.replicas:  # one registry: counters and histograms add up
            client.metrics = metrics

    def start(self) -> None:
        for rank, client in enumerate(self.replicas):
            client.step_timeout = self.step_timeout
            client.on_dead = lambda rank=rank: self._replica_dead(rank)
            client.start()

    def stop(self, timeout: float = 5.0) -> None:
        for client in self.replicas:
            client.stop(timeout)

    @property
    def running(self) -> bool:
        return any(client.running for client in self.replicas)

    @property
    def gauges(self) -> dict[str, float]:
        live = [self.replicas[r].gauges for r in self._live] or [self.replicas[0].gauges]
        return {"num_running": sum(g["num_running"] for g in live),
                "num_waiting": sum(g["num_waiting"] for g in live),
                "kv_cache_usage": sum(g["kv_cache_usage"] for g in live) / len(live)}

    @property
    def num_waiting(self) -> int:
        return sum(self.replicas[r].num_waiting for r in self._live)

    def pick(self) -> int:
        """The live replica with the fewest unfinished engine requests; ties go round-robin."""
        with self._lock:
            live = list(self._live)
        if not live:
            raise EngineDeadError(DEAD_MESSAGE)
        load = {r: self.replicas[r].num_unfinished for r in live}
        least = min(load.values())
        tied = [r for r in live if load[r] == least]
        return tied[next(self._next) % len(tied)]

    async def add(self, items: list):
        """Route one HTTP request's engine requests (all to one replica); a replica that died
        before acknowledging them leaves the rotation and they go to another."""
        while True:
            rank = self.pick()
            try:
                stream = await self.replicas[rank].add(items)
            except RequestFailedError:
                raise
            except EngineDeadError:
                if self.replicas[rank].error is None:
                    raise
                self._replica_dead(rank)  # idempotent; its on_dead may not have run yet
                continue
            self._owner[stream] = rank
            self.routed[rank] += 1
            return stream

    def abort(self, stream) -> None:
        rank = self._owner.get(stream)
        if rank is not None:
            self.replicas[rank].abort(stream)

    async def reset_prefix_cache(self) -> bool:
        """Every live replica's; True only if all of them reset."""
        results = [await self.replicas[r].reset_prefix_cache() for r in list(self._live)]
        return all(results)

    def _replica_dead(self, rank: int) -> None:
        with self._lock:
            if rank not in self._live:
                return
            self._live.remove(rank)
            left = len(self._live)
            if not left:
                self.error = self.replicas[rank].error or RuntimeError("every replica died")
        logger.critical("data-parallel replica %d died (%s); %d replica(s) left", rank,
                        self.replicas[rank].error, left)
        if not left and self.on_dead is not None:
            self.on_dead()
