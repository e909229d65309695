"""Prometheus text for GET /metrics: counters and histograms fed by the engine's outputs.

The engine thread (or the engine core client's receiver thread) observes TTFT, inter-token
latency, token counts and, with the engine core process, each request's queue / prefill / decode
time after each step; the HTTP side renders. One lock guards both, so a scrape never sees half an
update. With `--api-server-count N` each process also writes its counters to a shared directory
every second (share()), and a scrape of any process adds the others' latest.
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import threading
import time
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last = +Inf
    total: float = 0.0
    num: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.num += 1

    def add(self, counts: list[int], total: float, num: int) -> None:
        """Another process's histogram of the same buckets (state())."""
        self.counts = [a + b for a, b in zip(self.counts, counts)]
        self.total += total
        self.num += num

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        out.append(f"{name}_count{{{labels}}} {self.num}")
        return out


class ServerMetrics:
    """Counters and histograms under vLLM's metric names (`vllm:`), labelled with model_name."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{model_name}"'
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue = Histogram(TTFT_BUCKETS)  # arrival -> first scheduled
        self.prefill = Histogram(TTFT_BUCKETS)  # first scheduled -> first token
        self.decode = Histogram(E2E_BUCKETS)  # first token -> finished
        self._shared: tuple[str, int] | None = None  # (directory, this process's index)

    _HISTOGRAMS = ("ttft", "itl", "e2e", "queue", "prefill", "decode")

    def state(self) -> dict:
        """The counters and histograms as JSON-able data (what share() writes)."""
        with self._lock:
            return {"prompt_tokens": self.prompt_tokens,
                    "generation_tokens": self.generation_tokens, "finished": dict(self.finished),
                    **{h: [list(getattr(self, h).counts), getattr(self, h).total,
                           getattr(self, h).num] for h in self._HISTOGRAMS}}

    def share(self, directory: str, index: int, period: float = 1.0) -> None:
        """Write state() to directory/<index>.json every `period` seconds (a daemon thread);
        render() then adds every other <n>.json there (API server processes of one server)."""
        self._shared = (directory, index)

        def publish() -> None:
            path = os.path.join(directory, f"{index}.json")
            while True:
                with open(path + ".tmp", "w") as f:
                    json.dump(self.state(), f)
                os.replace(path + ".tmp", path)  # a reader never sees half a file
                time.sleep(period)

        threading.Thread(target=publish, name="jaxserve-metrics-share", daemon=True).start()

    def _merged(self) -> ServerMetrics:
        """This process's metrics plus the other processes' latest shared state."""
        if self._shared is None:
            return self
        directory, index = self._shared
        total = ServerMetrics("")
        total.labels = self.labels
        states = [self.state()]
        for path in glob.glob(os.path.join(directory, "*.json")):
            if os.path.basename(path) != f"{index}.json":
                try:
                    with open(path) as f:
                        states.append(json.load(f))
                except (OSError, ValueError):  # gone with its process
                    continue
        for state in states:
            total.prompt_tokens += state["prompt_tokens"]
            total.generation_tokens += state["generation_tokens"]
            for reason, count in state["finished"].items():
                total.finished[reason] = total.finished.get(reason, 0) + count
            for h in self._HISTOGRAMS:
                getattr(total, h).add(*state[h])
        return total

    def on_tokens(self, num_new: int, ttft: float | None, itl: float | None) -> None:
        with self._lock:
            self.generation_tokens += num_new
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl)

    def on_prompt(self, num_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += num_tokens

    def on_scheduled(self, queue: float, prefill: float) -> None:
        """A request's first tokens: seconds it waited to be scheduled, then to its first token."""
        with self._lock:
            self.queue.observe(queue)
            self.prefill.observe(prefill)

    def on_finished(self, reasons: list[str], e2e: float, decode: float | None = None) -> None:
        with self._lock:
            for reason in reasons:
                self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(e2e)
            if decode is not None:
                self.decode.observe(decode)

    def render(self, gauges: dict[str, float]) -> str:
        """gauges: num_running, num_waiting, kv_cache_usage (a fraction) from the engine thread
        (the engine core's: the same for every API server process)."""
        merged = self._merged()
        if merged is not self:
            return merged.render(gauges)
        lab = self.labels
        lines = []

        def head(name, kind, doc):
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])

        for name, key, doc in (
                ("vllm:num_requests_running", "num_running", "Sequences in the running batch."),
                ("vllm:num_requests_waiting", "num_waiting", "Sequences waiting to be scheduled."),
                ("vllm:kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV pages in use.")):
            head(name, "gauge", doc)
            lines.append(f"{name}{{{lab}}} {float(gauges.get(key, 0.0))}")
        with self._lock:
            head("vllm:prompt_tokens_total", "counter", "Prompt tokens of admitted requests.")
            lines.append(f"vllm:prompt_tokens_total{{{lab}}} {self.prompt_tokens}")
            head("vllm:generation_tokens_total", "counter", "Generated tokens.")
            lines.append(f"vllm:generation_tokens_total{{{lab}}} {self.generation_tokens}")
            head("vllm:request_success_total", "counter", "Finished requests by finish reason.")
            for reason, count in sorted(self.finished.items()):
                lines.append(f'vllm:request_success_total{{{lab},finished_reason="{reason}"}} '
                             f"{count}")
            for name, hist, doc in (
                    ("vllm:time_to_first_token_seconds", self.ttft, "Time to first token."),
                    ("vllm:inter_token_latency_seconds", self.itl, "Time between tokens."),
                    ("vllm:e2e_request_latency_seconds", self.e2e, "Arrival to finish."),
                    ("vllm:request_queue_time_seconds", self.queue,
                     "Arrival to first scheduled (engine core process only)."),
                    ("vllm:request_prefill_time_seconds", self.prefill,
                     "First scheduled to first token (engine core process only)."),
                    ("vllm:request_decode_time_seconds", self.decode,
                     "First token to finish (engine core process only).")):
                head(name, "histogram", doc)
                lines.extend(hist.lines(name, lab))
        return "\n".join(lines) + "\n"
