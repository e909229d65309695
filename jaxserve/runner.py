"""ModelRunner: host Batch -> padded device arrays -> one jitted step (model + sampler) -> numpy tokens.

Owns the compiled steps, the shape buckets and the KV cache. Token counts are bucketed to powers of two
(the sequence rows follow the token bucket); the page table is max_model_len wide for the Pallas
kernels, which read only live pages, and bucketed to powers of two for the reference, whose cost
follows its width. warmup() (jaxserve/warmup.py) compiles and runs once every bucket of both
sampler variants (the deferred kind compiles in the background once a request needs it), so a
steady state never recompiles; a restart loads them from jaxserve/executable_cache.py, unlowered.
The step bodies are jaxserve/step.py's; their host inputs travel
packed in two buffers (jaxserve/packed_inputs.py). dispatch() returns at once and fetch() waits,
so the engine prepares step n+1 while step n runs; tokens sampled by step n feed step n+1 on
device (Batch.token_src). A deferred step (its token masks follow step n's tokens) is
dispatched as its forward pass, and sample() adds the sampling once the host has the masks.
Penalties read a device token history (jaxserve/sampling_inputs.py), written by each step.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import executable_cache
from jaxserve.batch import Batch
from jaxserve.kv_cache import AttentionMetadata, KVCache
from jaxserve.lora import NO_LORA_SLOT
from jaxserve.packed_inputs import PackSpec, pack, packed
from jaxserve.sampler import SamplerOutput
from jaxserve.sharding import replicated
from jaxserve.sampling_inputs import SamplingInputs, pad_to, pow2_at_least
from jaxserve.step import forward as _forward, sample_step as _sample, step as _step
from jaxserve.token_controls import TokenInputs
from jaxserve.warmup import StepWarmup

logger = logging.getLogger(__name__)


def token_buckets(max_num_batched_tokens: int, smallest: int = 8) -> tuple[int, ...]:
    """Powers of two from `smallest`, the last one covering max_num_batched_tokens."""
    buckets = [smallest]
    while buckets[-1] < max_num_batched_tokens:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)



@dataclass
class StepOutput:
    """Host copies of one step's results; row b = batch.seqs[b]."""

    token_ids: np.ndarray  # i32[B]
    logprobs: np.ndarray  # f32[B] logprob of the sampled token
    ranks: np.ndarray  # i32[B] its rank in the vocabulary (1 = the most likely)
    top_ids: np.ndarray  # i32[B, k]
    top_logprobs: np.ndarray  # f32[B, k]
    # Only when some sequence asked for prompt_logprobs (else None): row t = new token t of the batch.
    prompt_logprobs: np.ndarray | None = None  # f32[T] logprob of the token after token t
    prompt_top_ids: np.ndarray | None = None  # i32[T, k]
    prompt_top_logprobs: np.ndarray | None = None  # f32[T, k]


@dataclass(frozen=True)
class StepKey:
    """What selects a compiled step: the shapes and static fields of its inputs."""

    kind: str  # "step" (forward + sample fused), "forward" or "sample" (a deferred step)
    num_tokens: int
    page_table_width: int
    prompt_logprobs_k: int
    # The inputs' pytree structure (with the static metadata fields) and each array's shape,
    # dtype and place in the packed buffers (or on the device): packed_inputs.pack's layout.
    inputs: PackSpec


@dataclass
class StepHandle:
    """A dispatched step: device results not yet read. A deferred step has run its forward pass
    only (`logits` holds (logits, history ids)); sample() dispatches the rest."""

    batch: Batch
    out: SamplerOutput | None
    prompt: tuple | None
    logits: tuple | None = None

    @property
    def deferred(self) -> bool:
        return self.out is None


class ModelRunner(StepWarmup):
    """Holds the model state and KV cache; dispatch(batch) starts a step, fetch(handle) reads it."""

    def __init__(self, graphdef, state, kv_cache: KVCache, *, vocab_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, attention_impl: str,
                 mesh=None, max_logprobs: int = 20):
        self.graphdef, self.state, self.kv_cache = graphdef, state, kv_cache
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self.buckets = token_buckets(max(max_num_batched_tokens, max_num_seqs))
        self.max_rows = pow2_at_least(max_num_seqs, 8)
        self.max_pages_per_seq = -(-max_model_len // kv_cache.page_size)
        self.attention_impl = attention_impl
        # Kernels read only live pages, so a max_model_len-wide table costs nothing and keeps one
        # shape per token bucket; the reference's cost follows the width, so it is bucketed.
        self.full_width_page_table = attention_impl != "reference"
        self.mesh = mesh
        self.max_logprobs = min(max_logprobs, vocab_size)  # logprobs=-1: the whole vocabulary
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.num_lowerings = 0  # steps traced and lowered (a cache load skips it)
        self.num_cache_loads = 0  # steps loaded from the executable cache
        self.executable_cache = executable_cache.from_env(mesh, graphdef)  # None: off
        self.peak_temp_bytes = 0  # the most temporary memory any compiled step needs
        self._executables: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self._deferred_thread: threading.Thread | None = None
        self.deferred_ready = threading.Event()  # the deferred kind of step is compiled
        # Arguments: graphdef, state, kv_cache, history, prev_tokens, then the step's host inputs
        # packed (jaxserve/packed_inputs.py: spec, i32, f32, device arrays), prompt_logprobs_k.
        static, donate = (0, 5, 9), (2, 3)
        self._jit = jax.jit(packed(_step, 5, replicated), static_argnums=static,
                            donate_argnums=donate)
        # A deferred step (its masks follow the token in flight) runs as forward + sample.
        self._jit_forward = jax.jit(packed(_forward, 5, replicated), static_argnums=static,
                                    donate_argnums=donate)
        self._jit_sample = jax.jit(packed(_sample, 0, replicated), static_argnums=0)
        # Last step's sampled tokens, replicated on the mesh as each step returns them (an array
        # on one device would not lower for the background compile of deferred steps at TP > 1).
        with self._mesh_context():
            self._prev_tokens = jax.jit(lambda: replicated(jnp.zeros(self.max_rows, jnp.int32)))()
        self.sampling = SamplingInputs(vocab_size=vocab_size, max_num_seqs=max_num_seqs,
                                       max_model_len=max_model_len,
                                       max_logprobs=self.max_logprobs,
                                       mesh_context=self._mesh_context)

    # ---- padding -------------------------------------------------------------------------------
    def bucket_for(self, num_tokens: int) -> int:
        for size in self.buckets:
            if size >= num_tokens:
                return size
        raise ValueError(f"{num_tokens=} exceeds the largest token bucket {self.buckets[-1]}")

    def _rows_for(self, t_pad: int) -> int:
        return min(t_pad, self.max_rows)

    def _page_table_width(self, needed: int) -> int:
        if self.full_width_page_table:
            return self.max_pages_per_seq
        return min(max(pow2_at_least(needed, 8), needed), max(self.max_pages_per_seq, needed))

    def _inputs(self, batch: Batch, full_sampler: bool = False,
                tokens: TokenInputs | None = None) -> tuple[tuple, int]:
        """Padded host arrays for the step (everything but state, cache and prev tokens);
        full_sampler forces the full sampler variant (warm-up compiles both)."""
        t_pad = self.bucket_for(batch.num_tokens)
        b_pad = self._rows_for(t_pad)
        assert batch.num_seqs <= b_pad, (batch.num_seqs, b_pad)
        B = batch.num_seqs
        width = self._page_table_width(batch.page_table.shape[1])
        page_table = np.zeros((b_pad, width), np.int32)
        page_table[:B, :batch.page_table.shape[1]] = batch.page_table
        cu = np.full(b_pad + 1, batch.cu_q_lens[-1], np.int32)
        cu[:B + 1] = batch.cu_q_lens
        md = AttentionMetadata(
            positions=pad_to(batch.positions, t_pad, 0),
            slot_mapping=pad_to(batch.slot_mapping, t_pad, self.kv_cache.num_slots),
            page_table=page_table, kv_lens=pad_to(batch.kv_lens, b_pad, 0), cu_q_lens=cu,
            num_seqs=np.array([B], np.int32), attention_impl=self.attention_impl,
            lora_slots=pad_to(batch.lora_slots, t_pad, NO_LORA_SLOT))
        logits_idx = pad_to(batch.cu_q_lens[1:] - 1, b_pad, 0)
        prompt_k, next_ids = self._prompt_inputs(batch, t_pad)
        smd = self.sampling.metadata(batch, b_pad, full_sampler, tokens or TokenInputs())
        pen = self.sampling.penalty_inputs(batch, t_pad, b_pad) if smd.use_penalties else None
        args = (pad_to(batch.token_ids, t_pad, 0), pad_to(batch.token_src, t_pad, -1), logits_idx,
                next_ids, md, smd, pen)
        return args, prompt_k

    def _prompt_inputs(self, batch: Batch, t_pad: int) -> tuple[int, np.ndarray]:
        """(-1 if no prompt logprobs wanted else k, i32[t_pad] next prompt token of each token)."""
        starts = batch.positions[batch.cu_q_lens[:-1]]
        wanted = [s.params.prompt_logprobs for s, start in zip(batch.seqs, starts)
                  if s.params.prompt_logprobs is not None and start < s.num_prompt_tokens]
        next_ids = np.zeros(t_pad, np.int32)
        if not wanted:
            return -1, next_ids
        for b, seq in enumerate(batch.seqs):
            start, end = batch.cu_q_lens[b], batch.cu_q_lens[b + 1]
            ids = seq.prompt_token_ids
            next_ids[start:end] = [ids[p] if p < len(ids) else 0
                                   for p in batch.positions[start:end] + 1]
        return min(self.max_logprobs, max(wanted)), next_ids

    # ---- compilation ---------------------------------------------------------------------------
    @staticmethod
    def _key(args: tuple, prompt_k: int, kind: str = "step",
             spec: PackSpec | None = None) -> StepKey:
        """spec: pack(args)'s layout when the caller has packed them already."""
        num_tokens, width = int(args[0].shape[0]), 0
        if kind != "sample":
            width = args[4].page_table.shape[1]
        return StepKey(kind=kind, num_tokens=num_tokens, page_table_width=width,
                       prompt_logprobs_k=prompt_k, inputs=spec or pack(args)[0])

    def _leading(self, args: tuple, kind: str, leading: tuple | None = None) -> tuple:
        """The array arguments before the packed ones: (state, kv_cache, history, prev tokens),
        the runner's own unless `leading` (abstract ones) is given; none for "sample"."""
        if kind == "sample":
            return ()
        if leading is not None:
            return leading
        history = self.sampling.history if args[-1] is not None else None
        return self.state, self.kv_cache, history, self._prev_tokens

    def _lower(self, args: tuple, prompt_k: int, kind: str = "step",
               leading: tuple | None = None):
        """args: _inputs()'s for "step"; without smd for "forward"; (logits, smd, history ids,
        prev tokens) for "sample" (arrays or ShapeDtypeStructs)."""
        with self._lock:
            self.num_lowerings += 1
        with self._mesh_context():
            if kind == "sample":
                return self._jit_sample.lower(*pack(args))
            jit = self._jit if kind == "step" else self._jit_forward
            return jit.lower(self.graphdef, *self._leading(args, kind, leading), *pack(args),
                             prompt_k)

    def _executable(self, args: tuple, prompt_k: int, kind: str = "step",
                    spec: PackSpec | None = None, leading: tuple | None = None):
        """The compiled `kind` for args: from memory, else the executable cache, else lowered
        and compiled (then stored in the cache)."""
        key = self._key(args, prompt_k, kind, spec)
        exe = self._executables.get(key)
        if exe is None:
            disk_key = self._disk_key(key, args, leading)
            exe = self._load(key, disk_key) or self._compile(
                key, self._lower(args, prompt_k, kind, leading), disk_key)
        return exe

    def _disk_key(self, key: StepKey, args: tuple, leading: tuple | None = None) -> str | None:
        """The executable cache's key of step `key` on args (None when the cache is off)."""
        if self.executable_cache is None:
            return None
        dynamic = (*self._leading(args, key.kind, leading), *pack(args)[1:])
        return self.executable_cache.key(key, dynamic)

    def _load(self, key: StepKey, disk_key: str | None):
        """The executable cache's entry for key, kept in memory, or None."""
        exe = disk_key and self.executable_cache.load(disk_key)
        if exe is None:
            return None
        with self._lock:
            self._executables[key] = exe
            self.peak_temp_bytes = max(self.peak_temp_bytes, _temp_bytes(exe))
            self.num_cache_loads += 1
        return exe

    def _compile(self, key: StepKey, lowered, disk_key: str | None = None) -> object:
        start = time.perf_counter()
        exe = lowered.compile()
        seconds = time.perf_counter() - start
        temp = _temp_bytes(exe)
        with self._lock:
            self._executables[key] = exe
            self.peak_temp_bytes = max(self.peak_temp_bytes, temp)
            self.num_compiles += 1
            self.compile_seconds += seconds
            logger.info("compiled %s #%d (%d tokens, page table %s, %s) in %.1fs", key.kind,
                        self.num_compiles, key.num_tokens, key.page_table_width,
                        "prompt logprobs" if key.prompt_logprobs_k >= 0 else "plain", seconds)
        if disk_key is not None:
            self.executable_cache.store(disk_key, exe)
        return exe

    def _padding_batch(self, t_pad: int) -> Batch:
        """A step of t_pad padding tokens and no sequences: the shapes of a plain step."""
        return Batch(seqs=[], token_ids=np.zeros(t_pad, np.int32),
                     token_src=np.full(t_pad, -1, np.int32), positions=np.zeros(t_pad, np.int32),
                     slot_mapping=np.full(t_pad, self.kv_cache.num_slots, np.int32),
                     cu_q_lens=np.zeros(1, np.int32), kv_lens=np.zeros(0, np.int32),
                     page_table=np.zeros((0, self.max_pages_per_seq), np.int32),
                     sample_mask=np.zeros(0, bool), num_prefill_tokens=0, num_decode_tokens=0)

    # ---- execution -----------------------------------------------------------------------------
    def dispatch(self, batch: Batch, tokens: TokenInputs | None = None,
                 defer: bool = False) -> StepHandle:
        """Start the step on the device and return without waiting for it; `tokens`: the
        batch's token controls (masks, logit bias), if any row has one. defer: run the forward
        pass only; sample(handle, tokens) follows once the masks are known (they depend on the
        token still in flight), while the device computes the forward pass."""
        args, prompt_k = self._inputs(batch, full_sampler=defer, tokens=None if defer else tokens)
        if not defer:
            out, self._prev_tokens, prompt = self._call(args, prompt_k)
            return StepHandle(batch, out, prompt)
        logits, ids, prompt = self._call(args[:5] + args[6:], prompt_k, "forward")
        return StepHandle(batch, None, prompt, logits=(logits, ids))

    def _call(self, args: tuple, prompt_k: int, kind: str = "step") -> tuple:
        """Run the compiled `kind` ("step" or "forward") on args, packed; keeps the KV cache and
        token history it returns. -> its first three outputs."""
        history = self.sampling.history if args[-1] is not None else None
        spec, *buffers = pack(args)
        exe = self._executable(args, prompt_k, kind, spec)
        first, second, prompt, self.kv_cache, history = exe(
            self.state, self.kv_cache, history, self._prev_tokens, *buffers)
        if history is not None:
            self.sampling.history = history
        return first, second, prompt

    def sample(self, handle: StepHandle, tokens: TokenInputs | None = None) -> StepHandle:
        """Dispatch the sampling of a deferred step with its token controls."""
        logits, ids = handle.logits
        smd = self.sampling.metadata(handle.batch, logits.shape[0], True, tokens or TokenInputs())
        args = (logits, smd, ids, self._prev_tokens)
        spec, *buffers = pack(args)
        handle.out, self._prev_tokens = self._executable(args, -1, "sample", spec)(*buffers)
        handle.logits = None
        return handle

    def fetch(self, handle: StepHandle) -> StepOutput:
        """Wait for a dispatched step and copy its results to the host."""
        B, T = handle.batch.num_seqs, handle.batch.num_tokens
        out = jax.device_get(handle.out)
        result = StepOutput(token_ids=np.asarray(out.token_ids[:B]),
                            logprobs=np.asarray(out.logprobs[:B]),
                            ranks=np.asarray(out.ranks[:B]),
                            top_ids=np.asarray(out.top_ids[:B]),
                            top_logprobs=np.asarray(out.top_logprobs[:B]))
        if handle.prompt is not None:
            nxt, ids, lps = jax.device_get(handle.prompt)
            result.prompt_logprobs = np.asarray(nxt[:T])
            result.prompt_top_ids = np.asarray(ids[:T])
            result.prompt_top_logprobs = np.asarray(lps[:T])
        return result

    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    @property
    def jit_cache_size(self) -> int:
        return len(self._executables)


def _temp_bytes(exe) -> int:
    """Bytes of temporaries a compiled executable allocates per call (0 where not reported)."""
    try:
        analysis = exe.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return 0
    return int(getattr(analysis, "temp_size_in_bytes", 0) or 0)
