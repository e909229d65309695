"""Sampler: logits -> next tokens (and logprobs), on device, inside the jitted step.

The cost follows the batch, not the settings: no sort of the vocabulary, no threefry, and penalties
from the runner's on-device token history. Each [B, V] pass below is one read of the logits.
- Random numbers: a counter-based hash of (seed, token count, token index, round), mixed into the
  Gumbel-max argmax; a row's draw does not depend on the other rows of the batch.
- Top-k / top-p / min-p (exact, no sort): min-p is a threshold; top-k and top-p by rejection
  (FlashInfer's sorting-free sampling): draw j by Gumbel-max among the tokens above a pivot; accept
  if fewer than top_k tokens are strictly above j and their mass is below top_p, else the pivot
  becomes j's logit (every token at or below it is outside the kept set) and draw again. A draw
  from a superset, proportional to p, accepted when it lies in the kept set, is distributed as p
  truncated to that set. A top-k floor from chunk maxima starts the pivot near the k-th token.
- Kept set (as the sort-based `truncate_reference`, ties at the cut-off kept): token i is kept iff
  fewer than top_k tokens have a strictly larger logit, the mass of the strictly larger tokens is
  < top_p, and p_i >= min_p * p_max; all three on the full temperature-scaled distribution (vLLM
  renormalizes top-p over the top-k set, which keeps fewer tokens when that set's mass < top_p).
- Logprobs only when a row asked: logits - logsumexp and an exact two-level top-k (`top_k_exact`).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxserve.logits_processors import apply_penalties, apply_token_controls

_EXACT_TOP_K_MAX = 32  # larger logprob counts use lax.top_k (a sort) instead of k unrolled rounds
ROUNDS = 6  # rejection rounds (unrolled) before the exact bisection fallback (lax.cond, rare)
CHUNK = 128  # tokens per chunk of the top-k floor and of top_k_exact


@dataclass
class SamplingMetadata:
    """Row b describes sequence b of the step (padding rows: temperature 0, no penalties)."""

    temperature: jax.Array  # f32[B]; 0 = greedy
    top_k: jax.Array  # i32[B]; 0 = off
    top_p: jax.Array  # f32[B]; 1 = off
    min_p: jax.Array  # f32[B]; 0 = off
    seeds: jax.Array  # u32[B] per-sequence seed
    counters: jax.Array  # i32[B] tokens so far (hashed into the draw: a fresh draw each step)
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    repetition_penalty: jax.Array  # f32[B]
    # Token controls (jaxserve/token_controls.py); [B, 0] in the plain variant:
    token_mask: jax.Array  # i32[B, W] allowed-token bits (token t: bit t % 32 of word t // 32)
    bias_ids: jax.Array  # i32[B, NB] logit_bias token ids; pad = V
    bias_values: jax.Array  # f32[B, NB]
    want_logprobs: jax.Array  # bool[B] the row asked for logprobs (any: they are computed)
    # i32[B, L] the sequence's tokens at positions 0..L-1 (prompt, then output); pad = V.
    # Filled inside the step from the runner's device history; [B, 0] without penalties.
    history_ids: jax.Array
    prompt_lens: jax.Array  # i32[B] history_ids[b, :prompt_lens[b]] is the prompt
    # Static (compile-relevant):
    use_penalties: bool = False
    use_top_k: bool = False  # some random row has top_k > 0
    use_top_p: bool = False  # some random row has top_p < 1
    use_min_p: bool = False  # some random row has min_p > 0
    num_logprobs: int = -1  # top logprobs per row; 0 = only the sampled token's; -1 = none asked


jax.tree_util.register_dataclass(
    SamplingMetadata,
    data_fields=["temperature", "top_k", "top_p", "min_p", "seeds", "counters", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "token_mask", "bias_ids", "bias_values",
                 "want_logprobs", "history_ids",
                 "prompt_lens"],
    meta_fields=["use_penalties", "use_top_k", "use_top_p", "use_min_p",
                 "num_logprobs"],
)


@dataclass
class SamplerOutput:
    token_ids: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B] log-probability of the sampled token (raw model distribution)
    ranks: jax.Array  # i32[B] 1 + tokens with a strictly larger raw logit than the sampled one
    top_ids: jax.Array  # i32[B, k]
    top_logprobs: jax.Array  # f32[B, k]


jax.tree_util.register_dataclass(
    SamplerOutput, data_fields=["token_ids", "logprobs", "ranks", "top_ids", "top_logprobs"],
    meta_fields=[])


# ---- random numbers -----------------------------------------------------------------------------
def _mix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer: a bijection of u32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def row_keys(seeds: jax.Array, counters: jax.Array, rnd) -> jax.Array:
    """u32[B] key of each row's draw number `rnd` at token count `counters` (i32[B])."""
    x = _mix32(seeds.astype(jnp.uint32) ^ jnp.uint32(0x5BD1E995))
    x = _mix32(x + counters.astype(jnp.uint32) * jnp.uint32(0x9E3779B9))
    return _mix32(x + (jnp.asarray(rnd).astype(jnp.uint32) + 1) * jnp.uint32(0x27D4EB2F))


def gumbel(keys: jax.Array, vocab: int) -> jax.Array:
    """f32[B, V] standard Gumbel noise: hash(key_b + token index) -> uniform w -> -log(-log(1-w)).

    w keeps 24 significant bits down to 2^-33, so the large Gumbel values, which decide the
    argmax, are not quantized (a plain 24-bit u in [0, 1) steps by ~1% near the maximum)."""
    idx = jax.lax.broadcasted_iota(jnp.uint32, (1, vocab), 1)
    bits = _mix32(keys[:, None] + idx * jnp.uint32(0x9E3779B9))
    w = bits.astype(jnp.float32) * jnp.float32(2.0**-32) + jnp.float32(2.0**-33)
    return -jnp.log(-jnp.log1p(-w))


# ---- truncation ---------------------------------------------------------------------------------
def truncate_reference(scaled: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Sort-based: mask logits outside top_k / top_p / min_p with -inf (ties at the cut-off are
    kept). The oracle of the kept set (tests)."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(md.top_k > 0, md.top_k, vocab)[:, None]
    keep = (rank < k) & ((cum - probs) < md.top_p[:, None])
    keep &= probs >= md.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def _chunked(x: jax.Array, fill: float) -> jax.Array:
    """f32[B, V] -> f32[B, C, CHUNK], padded with `fill` (padding indices are >= V)."""
    B, V = x.shape
    C = -(-V // CHUNK)
    if C * CHUNK != V:
        x = jnp.pad(x, ((0, 0), (0, C * CHUNK - V)), constant_values=fill)
    return x.reshape(B, C, CHUNK)


def _top_k_floor(scaled: jax.Array, top_k: jax.Array) -> jax.Array:
    """f32[B] value below which no token is in the top_k (-inf if top_k is off or > groups): the
    top_k-th largest group maximum; k groups hold a token >= it, so the k-th token is >= it.
    Group c is the strided set {c, c + C, c + 2C, ...}: the max runs over the major axis of
    [B, CHUNK, C], a coalesced reduction (with contiguous chunks, the minor axis of [B, C, CHUNK],
    the profile of top_k rows showed a 1.0 ms/step reduce fusion at 512 x 128k on the H200)."""
    B, V = scaled.shape
    C = -(-V // CHUNK)
    padded = jnp.pad(scaled, ((0, 0), (0, C * CHUNK - V)), constant_values=-jnp.inf)
    chunk_max = padded.reshape(B, CHUNK, C).max(axis=1)  # f32[B, C]
    num_chunks = chunk_max.shape[1]
    ordered = -jnp.sort(-chunk_max, axis=-1)
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, num_chunks - 1)[:, None], 1)[:, 0]
    return jnp.where((top_k > 0) & (top_k <= num_chunks), kth, -jnp.inf)


def _draw(scaled, floor, pivot, md: SamplingMetadata, rnd) -> jax.Array:
    """i32[B] Gumbel-max draw among tokens with scaled >= floor and scaled > pivot (f32[B])."""
    noise = gumbel(row_keys(md.seeds, md.counters, rnd), scaled.shape[1])
    ok = (scaled >= floor[:, None]) & (scaled > pivot[:, None])
    return jnp.argmax(jnp.where(ok, scaled + noise, -jnp.inf), axis=-1).astype(jnp.int32)


def _sample_truncated(scaled, row_max, floor, first, md: SamplingMetadata):
    """(i32[B] tokens, bool[B] done) after ROUNDS rejection rounds for rows with top_k / top_p;
    `first` is round 0's draw. Each round is one pass: the check of the current draw and the next
    draw above it (used only if rejected). The rounds are unrolled, not a lax.while_loop: XLA:GPU
    reads a while loop's predicate on the host, which blocked the launch of every step until the
    device reached the loop (measured on the H200: 31-36 ms steps of ~20 ms device work). Each
    round after the first sits in a lax.cond on "some row still rejected", so a batch stops paying
    for rounds once every row is accepted (a row's token never depends on whether rounds ran)."""
    V = scaled.shape[1]
    random = md.temperature > 0
    check = random & (((md.top_k > 0) & (md.top_k < V)) | (md.top_p < 1.0))
    k_eff = jnp.where(md.top_k > 0, md.top_k, V + 1)
    total = jnp.sum(jnp.exp(scaled - row_max[:, None]), axis=-1) if md.use_top_p else None

    def accepts(j):
        value = jnp.take_along_axis(scaled, j[:, None], axis=1)  # f32[B, 1]
        above = scaled > value
        ok = jnp.sum(above, axis=-1) < k_eff
        if md.use_top_p:
            mass = jnp.sum(jnp.where(above, jnp.exp(scaled - row_max[:, None]), 0.0), axis=-1)
            ok &= (md.top_p >= 1.0) | (mass < md.top_p * total)
        return ok, value[:, 0]

    def rounds(rnd, j, done, token):
        ok, value = accepts(j)
        token = jnp.where(ok & ~done, j, token)
        done = done | ok
        if rnd + 1 == ROUNDS:
            return token, done
        # The next round runs only if some row is still rejected (a cond, no loop: see above).
        return jax.lax.cond(jnp.all(done), lambda: (token, done), lambda: rounds(
            rnd + 1, jnp.where(done, j, _draw(scaled, floor, value, md, rnd + 1)), done, token))

    if ROUNDS == 0:
        return first, ~check
    return rounds(0, first, ~check, first)


def _order_keys(x: jax.Array) -> jax.Array:
    """u32 keys with the order of the f32 values (-inf lowest; no NaNs here)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def kept_threshold(scaled: jax.Array, row_max: jax.Array, md: SamplingMetadata) -> jax.Array:
    """u32[B] key t with top-k / top-p's kept set = {i : key_i >= t}, by bisection (32 passes,
    no sort): token i is kept iff P(key_i), P(x) = fewer than top_k keys > x and their mass <
    top_p; P is monotone in x, so the kept set is every key >= the smallest x with P(x)."""
    keys = _order_keys(scaled)
    weights = jnp.exp(scaled - row_max[:, None])
    bound = md.top_p * jnp.sum(weights, axis=-1)
    k_eff = jnp.where(md.top_k > 0, md.top_k, scaled.shape[1] + 1)
    lo = jnp.zeros_like(row_max, jnp.uint32)
    hi = jnp.max(keys, axis=-1)  # P(max) holds: nothing is above it
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        above = keys > mid[:, None]
        ok = jnp.sum(above, axis=-1) < k_eff
        ok &= (md.top_p >= 1.0) | (jnp.sum(jnp.where(above, weights, 0.0), axis=-1) < bound)
        hi, lo = jnp.where(ok, mid, hi), jnp.where(ok, lo, mid + 1)
    return hi


def _fallback(scaled, row_max, floor, token, done, md: SamplingMetadata) -> jax.Array:
    """Rows not `done` after the rejection rounds: an exact draw from the kept set found by
    bisection. (A sort here, inside the lax.cond, made XLA:GPU wait for the device at every
    launch, as lax.top_k and a while loop inside a cond do; a loop-free reduction does not.)"""
    ok = (_order_keys(scaled) >= kept_threshold(scaled, row_max, md)[:, None])
    ok &= scaled >= floor[:, None]
    noise = gumbel(row_keys(md.seeds, md.counters, ROUNDS + 1), scaled.shape[1])
    draw = jnp.argmax(jnp.where(ok, scaled + noise, -jnp.inf), axis=-1).astype(jnp.int32)
    return jnp.where(done, token, draw)


def _scaled(logits, md: SamplingMetadata) -> jax.Array:
    temp = jnp.where(md.temperature > 0, md.temperature, 1.0)
    return logits / temp[:, None]


def _sample_random(logits, row_max, md: SamplingMetadata):
    """(i32[B] tokens, bool[B] done, f32[B] floor) of the rows with temperature > 0 (other rows:
    anything); a row not done needs the fallback, which reuses the floor."""
    temp = jnp.where(md.temperature > 0, md.temperature, 1.0)
    scaled = _scaled(logits, md)
    scaled_max = row_max / temp
    floor = jnp.full_like(scaled_max, -jnp.inf)
    if md.use_min_p:  # p_i >= min_p * p_max  <=>  scaled_i >= max + log(min_p)
        floor = jnp.where(md.min_p > 0, scaled_max + jnp.log(md.min_p), floor)
    if md.use_top_k:
        floor = jnp.maximum(floor, _top_k_floor(scaled, md.top_k))
    first = _draw(scaled, floor, jnp.full_like(floor, -jnp.inf), md, 0)
    if not (md.use_top_k or md.use_top_p):
        return first, jnp.ones_like(first, bool), floor
    return *_sample_truncated(scaled, scaled_max, floor, first, md), floor


# ---- logprobs -----------------------------------------------------------------------------------
def top_k_exact(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(f32[B, k] values, i32[B, k] ids) of the k largest of f32[B, V], as lax.top_k (descending,
    ties to the lower index), for small static k: one pass for the chunk maxima, then k rounds
    over [B, C] + one [B, CHUNK] chunk (a two-level tournament), never a sort of the vocabulary."""
    B, V = x.shape
    chunks = _chunked(x, -jnp.inf)  # f32[B, C, W]
    lane = jnp.arange(CHUNK, dtype=jnp.int32)[None, :]
    pos = jnp.argmax(chunks, axis=-1).astype(jnp.int32)  # i32[B, C] lane of each chunk's max
    best = jnp.take_along_axis(chunks, pos[..., None], axis=-1)[..., 0]  # f32[B, C]
    rows = jnp.arange(B)
    values, ids = [], []
    for _ in range(k):
        c = jnp.argmax(best, axis=-1).astype(jnp.int32)  # first max = lowest index among ties
        v, w = best[rows, c], pos[rows, c]
        values.append(v)
        ids.append(c * CHUNK + w)
        chunk = jnp.take_along_axis(chunks, c[:, None, None], axis=1)[:, 0]  # f32[B, W]
        # Taken from this chunk so far: every (value, lane) >= (v, w) in (desc, asc) order.
        left = (chunk < v[:, None]) | ((chunk == v[:, None]) & (lane > w[:, None]))
        nxt = jnp.where(left, chunk, -jnp.inf)
        nw = jnp.argmax(nxt, axis=-1).astype(jnp.int32)
        best = best.at[rows, c].set(nxt[rows, nw])
        pos = pos.at[rows, c].set(nw)
    return jnp.stack(values, axis=1), jnp.minimum(jnp.stack(ids, axis=1), V - 1)


def _logprobs(raw: jax.Array, tokens: jax.Array, k: int):
    """Raw-distribution logprobs: f32[B] and i32[B] rank of tokens, top-k (i32[B, k], f32[B, k])."""
    lse = jax.nn.logsumexp(raw, axis=-1)
    token_raw = jnp.take_along_axis(raw, tokens[:, None], axis=-1)
    ranks = jnp.sum(raw > token_raw, axis=-1).astype(jnp.int32) + 1
    token_lp = token_raw[:, 0] - lse
    if k == 0:
        B = raw.shape[0]
        return token_lp, ranks, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
    # top_k_exact unrolls k rounds: fine for the usual k <= 20, not for --max-logprobs 1000.
    values, ids = top_k_exact(raw, k) if k <= _EXACT_TOP_K_MAX else jax.lax.top_k(raw, k)
    return token_lp, ranks, ids.astype(jnp.int32), values - lse[:, None]


@jax.jit
def sample(logits: jax.Array, md: SamplingMetadata) -> SamplerOutput:
    """f32[B, V] logits -> SamplerOutput. Logprobs are of the raw (unpenalized) distribution; when
    no row asked (num_logprobs < 0) they are zeros and [B, 0]. Its own jit so that the step shapes
    whose rows match (token buckets >= max_num_seqs) trace its unrolled rounds once (start-up)."""
    with jax.named_scope("sample"):
        raw = logits.astype(jnp.float32)
        logits = apply_token_controls(raw, md)  # vLLM's order: bias and masks, then penalties
        logits = apply_penalties(logits, md) if md.use_penalties else logits
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

        row_max = jnp.take_along_axis(logits, greedy[:, None], axis=-1)[:, 0]
        random = md.temperature > 0

        def draw():
            token, done, floor = _sample_random(logits, row_max, md)
            return jnp.where(random, token, greedy), done | ~random, floor

        # Runtime branches, not static flags: greedy and plain sampling share one compiled step.
        # XLA:GPU launches a cond without waiting for the device only if its branches hold no
        # loop, lax.top_k or large sort (measured on the H200: such a cond blocked each launch).
        tokens, done, floor = jax.lax.cond(
            jnp.any(random), draw,
            lambda: (greedy, jnp.ones_like(greedy, bool), jnp.full_like(row_max, -jnp.inf)))
        if md.use_top_k or md.use_top_p:
            temp = jnp.where(random, md.temperature, 1.0)
            tokens = jax.lax.cond(jnp.all(done), lambda: tokens, lambda: _fallback(
                _scaled(logits, md), row_max / temp, floor, tokens, done, md))
        B, k = logits.shape[0], max(md.num_logprobs, 0)

        def no_logprobs():
            return (jnp.zeros(B, jnp.float32), jnp.zeros(B, jnp.int32),
                    jnp.zeros((B, k), jnp.int32), jnp.zeros((B, k), jnp.float32))

        if md.num_logprobs < 0:
            return SamplerOutput(tokens, *no_logprobs())
        # The full variant compiles logprobs in; they run only in steps where a row asked
        # (lax.top_k, used above _EXACT_TOP_K_MAX, inside a cond would block each launch).
        if md.num_logprobs > _EXACT_TOP_K_MAX:
            return SamplerOutput(tokens, *_logprobs(raw, tokens, md.num_logprobs))
        lps = jax.lax.cond(jnp.any(md.want_logprobs),
                           lambda: _logprobs(raw, tokens, md.num_logprobs), no_logprobs)
        return SamplerOutput(tokens, *lps)
