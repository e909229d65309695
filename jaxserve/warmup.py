"""Warm-up of a ModelRunner's steps, as a mixin (ModelRunner inherits it; it uses the runner's
_inputs / _key / _disk_key / _load / _lower / _compile / _executable / _padding_batch and its
state): every token bucket's fused step compiled (or loaded from the executable cache) at
start-up and run once; the deferred (forward, then sample) kind compiled in the background when
the first request that needs it arrives."""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax

from jaxserve.batch import Batch

logger = logging.getLogger("jaxserve.runner")


@contextlib.contextmanager
def paused_gc():
    """Python's cyclic garbage collector paused (if it was on): tracing allocates millions of
    objects that live until the step is lowered, and every full collection walks them all.
    Llama-3-8B's 22 shapes lowered for cuda on CPU: 2.1 s in GC, 16.8 s -> 14.8 s without.
    Reference counting still frees all but cycles (+45 MiB over the warm-up, collected after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class StepWarmup:
    def warmup_shapes(self) -> list[tuple[int, bool]]:
        """(token bucket, full sampler) of every fused step, in the order warm-up lowers them:
        the longest compiles first (the full sampler's took ~2.3x the plain one's, larger buckets
        a little longer: Llama-3-8B on CPU, benchmarks/startup_trace.py --compile), so that the
        shape lowered last, whose compile ends the warm-up, is the quickest (plain, decode)."""
        return [(t_pad, full) for full in (True, False) for t_pad in reversed(self.buckets)]

    def warmup(self, run: bool = True) -> None:
        """Compile both sampler variants of every token bucket. First each is looked up in the
        executable cache (jaxserve/executable_cache.py; loads run in a pool): a hit is neither
        traced, lowered nor compiled. Each miss is traced and lowered on this thread (Python,
        holds the GIL: more threads lowered no faster) and compiled in a pool of up to 8 threads
        as soon as it is lowered (XLA compiles off the GIL), so tracing overlaps compiling. On
        the H100, Llama-3-8B, 11 buckets: lowering all first, then compiling, took 25 s + 46.5 s.
        Then (run) each runs once (_run_once)."""
        start = time.perf_counter()
        workers = max(1, min(len(self.buckets), 8, os.cpu_count() or 1))
        todo, batches = [], []  # (args, prompt_k, StepKey, cache key) of the shapes not in memory
        for t_pad, full in self.warmup_shapes():
            batch = self._padding_batch(t_pad)
            args, prompt_k = self._inputs(batch, full_sampler=full)
            batches.append((batch, full))
            key = self._key(args, prompt_k)
            if key not in self._executables:
                todo.append((args, prompt_k, key, self._disk_key(key, args)))
        with ThreadPoolExecutor(max_workers=workers) as pool, paused_gc():
            loaded = list(pool.map(lambda t: self._load(t[2], t[3]), todo))
            loaded_at = time.perf_counter()
            futures = [pool.submit(self._compile, key, self._lower(args, prompt_k), disk_key)
                       for (args, prompt_k, key, disk_key), exe in zip(todo, loaded)
                       if exe is None]
            lowered_at = time.perf_counter()
            for f in futures:
                f.result()  # re-raise a failed compile here
        compiled_at = time.perf_counter()
        slowest = self._run_once(batches) if run else 0.0
        logger.info("warm-up: %d step shapes in %.1fs: %d from the executable cache in %.1fs, %d "
                    "compiled (the last lowered after %.1fs); each run once in %.1fs, the slowest "
                    "first run %.2fs; the largest step's temporaries: %.2f GiB (XLA's memory "
                    "analysis)", len(todo), time.perf_counter() - start,
                    len(todo) - len(futures), loaded_at - start, len(futures),
                    lowered_at - start, time.perf_counter() - compiled_at, slowest,
                    self.peak_temp_bytes / 2**30)

    def _run_once(self, batches: list[tuple[Batch, bool]]) -> float:
        """Run each warm-up step once on its padding batch (no sequence: every KV write goes to
        the padding slot, which write_kv drops), so that a device's one-time work at an
        executable's first run (e.g. building its CUDA graphs) is not paid by the first requests.
        Returns the slowest run's seconds."""
        slowest = 0.0
        for batch, full in batches:
            args, prompt_k = self._inputs(batch, full_sampler=full)
            t0 = time.perf_counter()
            out, self._prev_tokens, _ = self._call(args, prompt_k)
            jax.block_until_ready(out)
            slowest = max(slowest, time.perf_counter() - t0)
        return slowest

    def start_deferred_warmup(self) -> None:
        """Compile the deferred kind of step in a background thread, once: called when the first
        request whose masks follow its tokens arrives, so engines that never see one never pay
        its ~2 compiles per bucket (measured on the H200: 18 compiles in ~70 s of host time, which
        slowed every step they overlapped). Until `deferred_ready` is set the engine does not
        schedule such requests ahead (no deferred step is needed)."""
        with self._lock:
            if self._deferred_thread is not None:
                return
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                (self.state, self.kv_cache, self.sampling.history, self._prev_tokens))
            self._deferred_thread = threading.Thread(
                target=self._warm_deferred, args=(abstract,), daemon=True,
                name="jaxserve-warmup-deferred")
        self._deferred_thread.start()

    def _warm_deferred(self, abstract) -> None:
        """Compile the deferred kind (forward, then sample) of every bucket, from shapes only (the
        engine keeps running and donating the real buffers meanwhile)."""
        state, kv_cache, history, prev_tokens = abstract
        try:
            for t_pad in self.buckets:
                args, prompt_k = self._inputs(self._padding_batch(t_pad), full_sampler=True)
                if history is None:  # _inputs allocated it (the first penalty inputs)
                    h = self.sampling.history
                    history = jax.ShapeDtypeStruct(h.shape, h.dtype, sharding=h.sharding)
                fwd_args = args[:5] + args[6:]
                forward = self._executable(fwd_args, prompt_k, "forward",
                                           leading=(state, kv_cache, history, prev_tokens))
                # The sample step must take the forward's output shardings (left to the
                # compiler, they differed at TP > 1: a sharding mismatch at call).
                logits, ids = jax.tree.map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                    forward.out_info[:2], forward.output_shardings[:2])
                self._executable((logits, args[5], ids, prev_tokens), -1, "sample")
        except Exception:  # never fatal: the engine compiles what it needs on the spot
            logger.exception("background warm-up of deferred steps failed")
        finally:
            self.deferred_ready.set()
