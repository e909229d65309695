"""Token controls: logit_bias, allowed_token_ids, bad_words, min_tokens and grammar masks, on device
against a plain loop, and through the engine on a tiny Llama against transformers' logits."""
from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.logits_processors import apply_token_controls, apply_token_controls_reference
from jaxserve.sampler import sample
from jaxserve.structured_outputs import StructuredOutputsParams, allowed_tokens
from jaxserve.token_controls import bad_words_token_ids, clear_bits, mask_row
from tests.engine.test_sampler import make_md
from tests.engine.tiny import build_tiny_llama, hf_logprobs


@pytest.mark.parametrize("V", [97, 128, 1000])  # not a multiple of 32, a multiple, larger
def test_device_controls_equal_the_loop(V):
    rng = np.random.default_rng(V)
    B = 6
    logits = rng.standard_normal((B, V)).astype(np.float32)
    mask = rng.integers(-2**31, 2**31, (B, -(-V // 32)), dtype=np.int64).astype(np.int32)
    mask[0] = -1  # a row with everything allowed
    ids = np.full((B, 8), V, np.int32)
    values = np.zeros((B, 8), np.float32)
    ids[:, :5] = rng.integers(0, V, (B, 5))
    ids[2, 1] = ids[2, 0]  # a repeated id adds twice, as the reference loop does
    values[:, :5] = rng.uniform(-5, 5, (B, 5))
    md = make_md(B, V, token_mask=mask, bias_ids=ids, bias_values=values)
    got = np.asarray(jax.jit(apply_token_controls)(jnp.asarray(logits), md))
    want = np.asarray(apply_token_controls_reference(logits, md))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
    assert np.isinf(want).any() and not np.isinf(want[0]).any()


def test_mask_rows_and_sampling_stay_inside():
    V = 300
    row = mask_row([5, 64, 299], V)
    assert allowed_tokens(row, V).tolist() == [5, 64, 299]
    clear_bits(row, [64])
    assert allowed_tokens(row, V).tolist() == [5, 299]
    B = 64
    md = make_md(B, V, temperature=2.0, seeds=np.arange(B), token_mask=np.tile(row, (B, 1)),
                 top_p=0.9, num_logprobs=3)
    logits = np.random.default_rng(0).standard_normal((B, V)).astype(np.float32)
    out = jax.jit(sample)(jnp.asarray(logits), md)
    assert set(np.asarray(out.token_ids).tolist()) == {5, 299}
    # Logprobs stay those of the raw model distribution (vLLM's default raw_logprobs).
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    np.testing.assert_allclose(np.asarray(out.top_logprobs), -np.sort(-ref)[:, :3], atol=1e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_controls"), seed=3)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", page_size=4, num_kv_pages=64, max_num_seqs=8,
               max_num_batched_tokens=64, max_model_len=64)


PROMPT = [5, 17, 42, 9, 100, 7]


def _greedy(llm, **kw):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, **kw)
    return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids


def test_logit_bias_shifts_the_model_logits(llm, model_dir):
    """The first token under a bias is the argmax of transformers' logits plus that bias."""
    ref = hf_logprobs(model_dir, PROMPT)[-1]
    top2 = np.argsort(-ref)[:2]
    bias = {int(top2[1]): float(ref[top2[0]] - ref[top2[1]] + 0.5)}
    assert _greedy(llm, logit_bias=bias)[0] == top2[1]
    assert _greedy(llm, logit_bias={int(top2[0]): -100.0})[0] == top2[1]
    assert _greedy(llm)[0] == top2[0]


def test_allowed_token_ids_and_bad_words(llm):
    free = _greedy(llm)
    allowed = [3, 77, 200, int(free[1])]
    params = SamplingParams(temperature=1.5, max_tokens=12, allowed_token_ids=allowed, seed=1,
                            ignore_eos=True)
    outs = llm.generate([PROMPT] * 4, params, use_tqdm=False)
    assert all(set(o.outputs[0].token_ids) <= set(allowed) for o in outs)
    tok = llm.get_tokenizer()
    word = tok.decode([free[0]])
    banned = _greedy(llm, bad_words=[word])
    assert free[0] not in banned[:1] and banned != free
    for ids in bad_words_token_ids([word], tok):
        n = len(ids)
        assert all(banned[i:i + n] != ids for i in range(len(banned)))


def test_multi_token_bad_word_is_cut_at_its_last_token(llm):
    """A bad word of several tokens: its last token is forbidden only right after its prefix."""
    free = _greedy(llm)
    tok = llm.get_tokenizer()
    word = tok.decode(free[1:3])
    ids = bad_words_token_ids([word], tok)
    if not any(len(i) > 1 and list(i) == free[1:3] for i in ids):
        pytest.skip(f"{word!r} does not tokenize back to the same two tokens")
    out = _greedy(llm, bad_words=[word])
    assert out[:2] == free[:2] and out[2] != free[2]


def test_mixed_batch_keeps_free_rows_unchanged(llm):
    """Constrained and free requests in one batch: the free ones equal their solo run."""
    free = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                 allowed_token_ids=[1, 2, 3], logit_bias={2: 5.0},
                                 bad_words=["a"])
    solo = llm.generate([PROMPT], free, use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate([PROMPT, PROMPT, PROMPT], [free, constrained, free], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == solo == outs[2].outputs[0].token_ids
    assert set(outs[1].outputs[0].token_ids) <= {1, 2, 3}


def test_choice_and_regex_grammars_on_the_tiny_model(llm):
    """Structured outputs through the engine, sampled hot, with free requests in the batch."""
    choice = StructuredOutputsParams(choice=["yes", "no", "maybe later"])
    regex = StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2}")
    params = [SamplingParams(temperature=1.5, max_tokens=20, seed=i, structured_outputs=s)
              for i, s in enumerate([choice, regex] * 4)]
    params.append(SamplingParams(temperature=1.0, max_tokens=8, seed=9))
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    for o, p in zip(outs[:-1], params):
        text = o.outputs[0].text
        if p.structured_outputs.choice:
            assert text in {"yes", "no", "maybe later"}, text
        else:
            import re
            assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", text), text
        assert o.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("field,value,bad", [
    ("logit_bias", {10**6: 1.0}, "logit_bias"), ("allowed_token_ids", [10**6], "allowed_token_ids"),
    ("allowed_token_ids", [], "allowed_token_ids"), ("logit_bias", {1: float("nan")}, "logit_bias"),
    ("bad_words", [""], "bad_words"), ("logit_bias", {i: 1.0 for i in range(301)}, "logit_bias")])
def test_bad_controls_are_value_errors_naming_the_field(llm, field, value, bad):
    with pytest.raises(ValueError, match=bad):
        llm.generate([PROMPT], SamplingParams(max_tokens=2, **{field: value}), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_grammar_is_a_value_error(llm):
    with pytest.raises(ValueError, match="regex"):
        llm.generate([PROMPT], SamplingParams(
            max_tokens=2, structured_outputs=StructuredOutputsParams(regex="(unclosed")),
            use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_logprobs_minus_one_is_the_whole_vocabulary(model_dir):
    """vLLM's logprobs=-1: every token's logprob, allowed when max_logprobs covers the vocabulary."""
    llm = LLM(str(model_dir), dtype="float32", page_size=4, num_kv_pages=16, max_num_seqs=2,
              max_num_batched_tokens=16, max_model_len=32, max_logprobs=1000)
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, logprobs=-1),
                       use_tqdm=False)[0].outputs[0]
    ref = hf_logprobs(model_dir, PROMPT)[-1]
    entry = out.logprobs[0]
    assert len(entry) == len(ref) == 384
    np.testing.assert_allclose([entry[t].logprob for t in range(len(ref))], ref, atol=1e-4)


def _deferred_steps_compiled(engine) -> None:
    engine.runner.start_deferred_warmup()  # what the first constrained request does
    assert engine.runner.deferred_ready.wait(timeout=600)


def test_constrained_requests_before_the_deferred_steps_compile(model_dir):
    """Until the deferred kind of step is compiled (in the background, started by the first
    request whose mask follows its tokens), such requests are not scheduled ahead: no step is
    deferred, nothing compiles on the spot, and the tokens equal the ones the same request gets
    once deferred steps run."""
    llm = LLM(str(model_dir), dtype="float32", page_size=4, num_kv_pages=64, max_num_seqs=8,
              max_num_batched_tokens=64, max_model_len=64)
    runner, calls = llm.llm_engine.runner, []
    assert not runner.deferred_ready.is_set()  # nothing started it yet
    gate = threading.Event()
    warm = runner._warm_deferred
    runner._warm_deferred = lambda abstract: (gate.wait(), warm(abstract))  # held until released
    dispatch = runner.dispatch
    runner.dispatch = lambda *a, defer=False, **kw: calls.append(defer) or dispatch(
        *a, defer=defer, **kw)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(regex=r"[a-z]{40}"))
    try:
        before = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
        assert calls and not any(calls)  # no deferred step while they were not compiled
        gate.set()
        assert runner.deferred_ready.wait(timeout=600)
        calls.clear()
        after = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
        assert any(calls)  # now the steps scheduled ahead were deferred
    finally:
        gate.set()
    assert before == after and len(before) == 10


def test_constrained_sequences_advance_every_step(llm):
    """A mask that follows the tokens (grammar, multi-token bad word) does not cost the async
    pipeline: the step scheduled ahead runs its forward pass at once and samples once the mask is
    known, so a constrained request next to a free one advances in every step, as the free one
    does (skipping it while its token was in flight took twice the steps)."""
    engine = llm.llm_engine
    _deferred_steps_compiled(engine)
    regex = StructuredOutputsParams(regex=r"[a-z]{40}")
    steps = {}
    for name, kw in [("free", {}), ("grammar", dict(structured_outputs=regex))]:
        before = engine.stats["steps"]
        params = [SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True),
                  SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, **kw)]
        outs = llm.generate([PROMPT, PROMPT[:4]], params, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [12, 12]
        steps[name] = engine.stats["steps"] - before
    assert steps["grammar"] <= steps["free"] + 1, steps


def test_deferred_steps_sample_as_the_fused_step(llm):
    """A multi-token bad word that never matches makes every step scheduled ahead deferred
    (forward, then sample): the tokens equal the fused step's, for it and the free rows."""
    tok = llm.get_tokenizer()
    word = "zqxzqxzqx"
    assert any(len(ids) > 1 for ids in bad_words_token_ids([word], tok))
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6]]
    free = [SamplingParams(temperature=t, seed=i, max_tokens=10, ignore_eos=True, logprobs=2)
            for i, t in enumerate([0.0, 1.0, 0.7])]
    deferred = [free[0], dataclasses.replace(free[1], bad_words=[word]), free[2]]
    a = llm.generate(prompts, free, use_tqdm=False)
    _deferred_steps_compiled(llm.llm_engine)
    runner, calls = llm.llm_engine.runner, []
    sample = runner.sample
    runner.sample = lambda *args, **kw: calls.append(1) or sample(*args, **kw)
    try:
        b = llm.generate(prompts, deferred, use_tqdm=False)
    finally:
        runner.sample = sample
    assert len(calls) >= 8  # the steps after the first were deferred
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].cumulative_logprob == pytest.approx(y.outputs[0].cumulative_logprob,
                                                                abs=1e-5)


def test_masked_and_biased_steps_reuse_the_full_variant(model_dir):
    """A step with its own mask or logit bias runs the full sampler variant's executable (the one
    warm-up compiles): its controls travel as device arrays shaped like the neutral ones. Packed
    with the host inputs they changed the step's input layout and compiled every bucket again
    mid-run (seen in a timed structured-output run on the H200)."""
    llm = LLM(str(model_dir), dtype="float32", page_size=4, num_kv_pages=64, max_num_seqs=8,
              max_num_batched_tokens=64, max_model_len=64, enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    full = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    llm.generate([PROMPT], full, use_tqdm=False)  # the full variant at these buckets
    compiled = runner.num_compiles
    for controls in [dict(allowed_token_ids=[3, 7, 11]), dict(logit_bias={5: 3.0}),
                     dict(allowed_token_ids=[3, 7], logit_bias={7: -2.0})]:
        out = llm.generate([PROMPT], dataclasses.replace(full, **controls),
                           use_tqdm=False)[0].outputs[0].token_ids
        if "allowed_token_ids" in controls:
            assert set(out) <= set(controls["allowed_token_ids"])
    assert runner.num_compiles == compiled
