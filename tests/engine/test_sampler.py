"""The fast sampler against the slow, obviously right one (sort-based truncation, [B, V] counts):
greedy tokens, kept sets, the sampled distribution (chi-square), seeds, exact top-k, penalties."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxserve import sampler
from jaxserve.logits_processors import apply_penalties, apply_penalties_reference
from jaxserve.sampler import SamplingMetadata, sample, top_k_exact, truncate_reference


def make_md(B: int, V: int, **fields) -> SamplingMetadata:
    """Metadata for B rows; per-row fields may be scalars (broadcast) or arrays."""
    cols = dict(temperature=(1.0, np.float32), top_k=(0, np.int32), top_p=(1.0, np.float32),
                min_p=(0.0, np.float32), seeds=(0, np.uint32), counters=(0, np.int32),
                presence_penalty=(0.0, np.float32), frequency_penalty=(0.0, np.float32),
                repetition_penalty=(1.0, np.float32), prompt_lens=(0, np.int32),
                want_logprobs=(True, bool))
    kw = {name: np.broadcast_to(np.asarray(fields.pop(name, default), dtype), (B,)).copy()
          for name, (default, dtype) in cols.items()}
    kw["token_mask"] = np.asarray(fields.pop("token_mask", np.zeros((B, 0))), np.int32)
    kw["bias_ids"] = np.asarray(fields.pop("bias_ids", np.zeros((B, 0))), np.int32)
    kw["bias_values"] = np.asarray(fields.pop("bias_values", np.zeros((B, 0))), np.float32)
    kw["history_ids"] = np.asarray(fields.pop("history_ids", np.zeros((B, 0))), np.int32)
    rand = kw["temperature"] > 0
    static = dict(use_top_k=bool(np.any(rand & (kw["top_k"] > 0))),
                  use_top_p=bool(np.any(rand & (kw["top_p"] < 1))),
                  use_min_p=bool(np.any(rand & (kw["min_p"] > 0))))
    static.update(fields)
    return SamplingMetadata(**kw, **static)


_sample = jax.jit(sample)


def kept_reference(logits: np.ndarray, md: SamplingMetadata) -> np.ndarray:
    """bool[B, V] tokens the sort-based truncation keeps."""
    temp = np.where(md.temperature > 0, md.temperature, 1.0)[:, None]
    return np.isfinite(np.asarray(truncate_reference(jnp.asarray(logits / temp), md)))


def draws(row: np.ndarray, n: int, **settings) -> np.ndarray:
    """n tokens sampled from one logits row (n rows of the batch, counters 0..n-1)."""
    md = make_md(n, row.shape[0], counters=np.arange(n), seeds=7, **settings)
    return np.asarray(_sample(jnp.asarray(np.tile(row, (n, 1))), md).token_ids)


def truncated_probs(row: np.ndarray, **settings) -> np.ndarray:
    md = make_md(1, row.shape[0], **settings)
    temp = settings.get("temperature", 1.0)
    kept = kept_reference(row[None], md)[0]
    p = np.where(kept, np.exp((row.astype(np.float64) - row.max()) / temp), 0.0)
    return p / p.sum()


SETTINGS = [
    dict(temperature=0.7, top_p=0.9), dict(temperature=1.0, top_k=20), dict(temperature=0.7, min_p=0.1),
    dict(temperature=0.7, top_k=20, top_p=0.8), dict(temperature=1.3, top_k=50, top_p=0.95, min_p=0.05),
    dict(temperature=1.0, top_p=1e-4), dict(temperature=1.0, top_k=1), dict(temperature=1.0),
    dict(temperature=0.5, top_k=999),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_distribution_equals_truncated_softmax(settings):
    """Chi-square over 4,000 draws of one distribution at a fixed seed; every draw in the kept set."""
    rng = np.random.default_rng(1)
    row = (rng.standard_normal(1000) * 2.5).astype(np.float32)
    p = truncated_probs(row, **settings)
    tokens = draws(row, 4000, **settings)
    assert p[tokens].min() > 0, "a token outside the reference kept set was sampled"
    observed = np.bincount(tokens, minlength=row.shape[0]).astype(float)
    expected = p * len(tokens)
    big = expected >= 5  # pool the small bins
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    if len(obs) > 1:
        assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_flat_distribution_kept_sets_on_a_large_vocabulary():
    """Dummy-weight-like logits (nearly flat, V=50,000): draws stay in the kept set, whatever mix
    of settings the rows of one batch carry (B=17)."""
    rng = np.random.default_rng(2)
    B, V = 17, 50_000
    logits = (rng.standard_normal((B, V)) * 0.05).astype(np.float32)
    md = make_md(B, V, temperature=rng.uniform(0.3, 1.5, B).astype(np.float32),
                 top_k=rng.choice([0, 1, 20, 50, 5000, V - 1], B),
                 top_p=rng.choice([1.0, 0.9, 0.5, 0.01], B), min_p=rng.choice([0.0, 0.5], B),
                 seeds=np.arange(B), counters=np.arange(B) * 3)
    kept = kept_reference(logits, md)
    for c in range(4):
        md.counters = md.counters + 1
        tokens = np.asarray(_sample(jnp.asarray(logits), md).token_ids)
        assert kept[np.arange(B), tokens].all()


@pytest.mark.parametrize("B, V", [(1, 1000), (3, 1000), (17, 50_000)])
def test_greedy_rows_are_the_argmax_in_mixed_batches(B, V):
    rng = np.random.default_rng(B)
    logits = rng.standard_normal((B, V)).astype(np.float32)
    temp = np.where(np.arange(B) % 2 == 0, 0.0, 0.8).astype(np.float32)
    md = make_md(B, V, temperature=temp, top_p=0.9, top_k=5, seeds=np.arange(B))
    tokens = np.asarray(_sample(jnp.asarray(logits), md).token_ids)
    greedy = temp == 0
    np.testing.assert_array_equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert kept_reference(logits, md)[np.arange(B), tokens].all()


def test_ties_at_the_cut_off_are_kept():
    """top_k 3 where tokens 10..14 tie for 3rd place: all five are kept (as `scaled >= threshold`)."""
    row = np.zeros(300, np.float32)
    row[[3, 7]] = [3.0, 2.5]
    row[10:15] = 2.0
    tokens = draws(row, 3000, temperature=1.0, top_k=3)
    assert set(np.unique(tokens)) == {3, 7, 10, 11, 12, 13, 14}
    tokens = draws(row, 500, temperature=1.0, top_p=1e-6)
    assert set(np.unique(tokens)) == {3}


def test_fallback_after_the_rounds_is_exact(monkeypatch):
    """With no rejection rounds every checked row takes the sort-based fallback: same distribution."""
    monkeypatch.setattr(sampler, "ROUNDS", 0)
    fn = jax.jit(sample)
    rng = np.random.default_rng(3)
    row = (rng.standard_normal(500) * 2).astype(np.float32)
    md = make_md(3000, 500, top_p=0.7, top_k=30, seeds=5, counters=np.arange(3000))
    tokens = np.asarray(fn(jnp.asarray(np.tile(row, (3000, 1))), md).token_ids)
    p = truncated_probs(row, top_p=0.7, top_k=30)
    assert p[tokens].min() > 0
    big = p * 3000 >= 5
    obs = np.bincount(tokens, minlength=500)[big]
    assert stats.chisquare(obs, p[big] * obs.sum() / p[big].sum()).pvalue > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bisection_kept_set_equals_the_sort(seed):
    """kept_threshold (the fallback's bisection) keeps exactly truncate_reference's set, with
    ties at the cut-off, negative and -inf logits, top-k alone, top-p alone and both."""
    rng = np.random.default_rng(seed)
    B, V = 24, 333
    scaled = (rng.standard_normal((B, V)) * rng.uniform(0.1, 4, (B, 1))).astype(np.float32)
    scaled[:8] = np.round(scaled[:8])  # many ties
    scaled[3, :100] = -np.inf
    md = make_md(B, V, top_k=rng.choice([0, 1, 5, 40, 400], B),
                 top_p=rng.choice([1.0, 0.05, 0.5, 0.9, 0.999], B))
    x = jnp.asarray(scaled)
    want = np.isfinite(np.asarray(sampler.truncate_reference(x, md)))
    t = sampler.kept_threshold(x, x.max(-1), md)
    got = np.asarray(sampler._order_keys(x) >= t[:, None])
    np.testing.assert_array_equal(got, want)


def test_seed_draw_does_not_depend_on_the_batch():
    rng = np.random.default_rng(4)
    V = 2000
    row = rng.standard_normal(V).astype(np.float32)
    settings = dict(temperature=0.9, top_p=0.9, top_k=40)
    alone = _sample(jnp.asarray(row[None]), make_md(1, V, seeds=11, counters=5, **settings))
    others = rng.standard_normal((5, V)).astype(np.float32)
    batch = np.concatenate([others[:3], row[None], others[3:]])
    md = make_md(6, V, seeds=[1, 2, 3, 11, 4, 5], counters=[9, 9, 9, 5, 9, 9],
                 temperature=[0.0, 1.0, 0.5, 0.9, 1.2, 0.9], top_p=[1, 1, 0.5, 0.9, 0.3, 1],
                 top_k=[0, 3, 0, 40, 0, 0], min_p=[0, 0, 0.2, 0, 0, 0], num_logprobs=4)
    mixed = _sample(jnp.asarray(batch), md)
    assert int(mixed.token_ids[3]) == int(alone.token_ids[0])
    again = _sample(jnp.asarray(row[None]), make_md(1, V, seeds=11, counters=6, **settings))
    tokens = {int(_sample(jnp.asarray(row[None]), make_md(1, V, seeds=11, counters=c, **settings))
                  .token_ids[0]) for c in range(8)}
    assert len(tokens) > 1 and int(again.token_ids[0]) in tokens


@pytest.mark.parametrize("V, k", [(1000, 1), (1000, 20), (50_000, 7), (333, 17)])
def test_top_k_exact_matches_lax_top_k(V, k):
    rng = np.random.default_rng(V + k)
    x = np.round(rng.standard_normal((5, V)) * 4).astype(np.float32)  # many ties
    values, ids = jax.jit(top_k_exact, static_argnums=1)(jnp.asarray(x), k)
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_v))
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_i))


@pytest.mark.parametrize("k", [5, 100])  # 100: beyond the unrolled exact top-k, lax.top_k
def test_logprobs_are_the_log_softmax_top_k(k):
    rng = np.random.default_rng(k)
    logits = rng.standard_normal((3, 700)).astype(np.float32)
    out = _sample(jnp.asarray(logits), make_md(3, 700, temperature=0.0, num_logprobs=k))
    logprobs = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    want_v, want_i = jax.lax.top_k(logprobs, k)
    np.testing.assert_array_equal(np.asarray(out.top_ids), np.asarray(want_i))
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.asarray(want_v), atol=1e-5)


def test_logprobs_only_when_asked():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((3, 700)).astype(np.float32)
    none = _sample(jnp.asarray(logits), make_md(3, 700, temperature=0.0))
    assert none.top_ids.shape == (3, 0)
    out = _sample(jnp.asarray(logits), make_md(3, 700, temperature=0.0, num_logprobs=5))
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    np.testing.assert_allclose(np.asarray(out.logprobs), ref.max(-1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), -np.sort(-ref)[:, :5], atol=1e-5)
    # A step of the logprobs variant where no row asked skips them (zeros), the tokens unchanged.
    skipped = _sample(jnp.asarray(logits), make_md(3, 700, temperature=0.0, num_logprobs=5,
                                                   want_logprobs=False))
    assert not np.asarray(skipped.top_logprobs).any() and not np.asarray(skipped.ranks).any()
    np.testing.assert_array_equal(np.asarray(skipped.token_ids), np.asarray(out.token_ids))


def test_rank_of_the_sampled_token_counts_the_whole_vocabulary():
    """rank = 1 + tokens with a larger raw logit, also far outside the top logprobs."""
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((64, 700)).astype(np.float32)
    out = _sample(jnp.asarray(logits), make_md(64, 700, temperature=1.0, seeds=np.arange(64),
                                               num_logprobs=2))
    tokens = np.asarray(out.token_ids)
    want = (logits > logits[np.arange(64), tokens][:, None]).sum(-1) + 1
    np.testing.assert_array_equal(np.asarray(out.ranks), want)
    assert want.max() > 2  # some sampled tokens are outside the top 2


def _random_history(rng, B, V, L):
    """(i32[B, L] history padded with V, i32[B] prompt lens) with repeats and prompt/output overlap."""
    lens = rng.integers(1, L + 1, B)
    prompt_lens = (lens * rng.uniform(0, 1, B)).astype(np.int32)
    ids = rng.integers(0, min(V, 40), (B, L)).astype(np.int32)  # a small id range: many repeats
    ids[np.arange(L)[None, :] >= lens[:, None]] = V
    return ids, prompt_lens


@pytest.mark.parametrize("B, V, L", [(1, 1000, 16), (3, 1000, 64), (17, 50_000, 33)])
def test_penalties_match_the_reference(B, V, L):
    rng = np.random.default_rng(B * L)
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    ids, prompt_lens = _random_history(rng, B, V, L)
    md = make_md(B, V, history_ids=ids, prompt_lens=prompt_lens, use_penalties=True,
                 repetition_penalty=rng.uniform(0.5, 2.0, B), presence_penalty=rng.uniform(-2, 2, B),
                 frequency_penalty=rng.uniform(-2, 2, B))
    pos = np.arange(L)[None, :]
    prompt = np.where(pos < prompt_lens[:, None], ids, V)
    output = np.where(pos >= prompt_lens[:, None], ids, V)
    got = jax.jit(apply_penalties)(jnp.asarray(logits), md)
    want = apply_penalties_reference(jnp.asarray(logits), jnp.asarray(prompt), jnp.asarray(output), md)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-5)


def test_repetition_penalty_matches_transformers():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(6)
    B, V, L = 4, 500, 24
    logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
    ids = rng.integers(0, V, (B, L)).astype(np.int32)
    md = make_md(B, V, history_ids=ids, prompt_lens=10, repetition_penalty=1.3, use_penalties=True)
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), md))
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids, dtype=torch.long),
                                                 torch.tensor(logits)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
