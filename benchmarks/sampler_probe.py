"""Which part of the full sampler variant makes a step's launch wait for the device (XLA:GPU)?

python -m benchmarks.sampler_probe [--rows 512 1024] [--vocab 152064]   (on the GPU)

The engine's full-variant steps spent ~4.5 ms more host time in dispatch than plain ones at the
same device time (H200, 2026-11-29, RESULTS.md session 6). As benchmarks/launch_probe.py, each
variant runs a ~20 ms matmul chain, then `sampler.sample` on logits that depend on the chain, and
prints the time until the call returns (dispatch) and until the result is ready (total); the
variants switch off the sampler's three runtime branches one at a time: the random draw
(`any(temperature > 0)`), the exact fallback (`all(done)`, compiled in with top-k/top-p) and
logprobs (`any(want_logprobs)`). total - the plain variant's total is the sampler's device cost."""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampler import SamplingMetadata, sample
from jaxserve.sampling_params import MAX_LOGIT_BIAS
from jaxserve.token_controls import num_words


def metadata(B: int, V: int, *, full: bool, top: bool, logprobs: bool) -> SamplingMetadata:
    f32 = lambda v: jnp.full(B, v, jnp.float32)  # noqa: E731
    return SamplingMetadata(
        temperature=f32(0.7), top_k=jnp.full(B, 50 if top else 0, jnp.int32),
        top_p=f32(0.9 if top else 1.0), min_p=f32(0.0), seeds=jnp.arange(B, dtype=jnp.uint32),
        counters=jnp.full(B, 100, jnp.int32), presence_penalty=f32(0.0),
        frequency_penalty=f32(0.0), repetition_penalty=f32(1.0),
        token_mask=jnp.full((B, num_words(V) if full else 0), -1, jnp.int32),
        bias_ids=jnp.full((B, MAX_LOGIT_BIAS if full else 0), V, jnp.int32),
        bias_values=jnp.zeros((B, MAX_LOGIT_BIAS if full else 0), jnp.float32),
        want_logprobs=jnp.full(B, logprobs), history_ids=jnp.zeros((B, 0), jnp.int32),
        prompt_lens=jnp.zeros(B, jnp.int32), use_penalties=False, use_top_k=full and top,
        use_top_p=full and top, use_min_p=full, num_logprobs=20 if full else -1)


def variants(B: int, V: int) -> dict[str, SamplingMetadata]:
    return {
        "plain": metadata(B, V, full=False, top=False, logprobs=False),
        "full": metadata(B, V, full=True, top=True, logprobs=True),
        "full, no logprobs asked": metadata(B, V, full=True, top=True, logprobs=False),
        "full, no top-k/top-p": metadata(B, V, full=True, top=False, logprobs=True),
        "full, neither": metadata(B, V, full=True, top=False, logprobs=False),
    }


def heavy(x):
    for _ in range(16):
        x = (x @ x) * jnp.bfloat16(1e-4)
    return x


def probe(B: int, V: int, dim: int) -> None:
    x = jnp.eye(dim, dtype=jnp.bfloat16)
    logits = jax.random.normal(jax.random.key(0), (B, V), jnp.float32) * 3
    for name, md in variants(B, V).items():
        arrays = {f.name: getattr(md, f.name) for f in dataclasses.fields(md)
                  if isinstance(getattr(md, f.name), jax.Array)}
        static = {k: v for k, v in dataclasses.asdict(md).items() if k not in arrays}

        def step(x, logits, arrays, static=static):
            h = heavy(x)
            m = SamplingMetadata(**arrays, **static)
            return h, sample(logits + h[0, 0].astype(jnp.float32), m).token_ids

        f = jax.jit(step)
        for _ in range(2):
            jax.block_until_ready(f(x, logits, arrays))
        best = None
        for _ in range(5):
            t0 = time.perf_counter()
            out = f(x, logits, arrays)
            t1 = time.perf_counter()
            jax.block_until_ready(out)
            r = ((t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3)
            best = r if best is None or r[1] < best[1] else best
        print(f"B={B:5d} {name:26s} dispatch {best[0]:7.2f} ms   total {best[1]:7.2f} ms",
              flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--dim", type=int, default=8192, help="the matmul chain's size (~20 ms at 8192)")
    args = p.parse_args(argv)
    print(jax.devices()[0].device_kind, np.__version__)
    for B in args.rows:
        probe(B, args.vocab, args.dim)


if __name__ == "__main__":
    main()
