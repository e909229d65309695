"""Issue 19: the collectives XLA puts into the compiled step at tensor parallelism 2 (fake CPU
devices) are exactly the intended ones, and sampling at TP=2 equals TP=1.

Intended (benchmarks/tp_collectives.py `unexpected`): 2 all-reduces of [T, D] per layer + 1 for the
embedding, one all-to-all of the logits to whole rows per shard, small all-gathers of the
sampler's outputs; nothing inside a conditional (XLA:GPU reads such a predicate on the host, so
the launch would wait for the device); no weight-, page- or lm_head-sized collective.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks.tp_collectives import TINY, abstract_runner, parse_collectives, step_hlo, unexpected
from jaxserve import LLM, SamplingParams
from jaxserve.sharding import make_mesh
from jaxserve.structured_outputs import StructuredOutputsParams
from tests.engine.tiny import build_tiny_llama

ENGINE_KW = dict(dtype="float32", page_size=4, num_kv_pages=64, max_num_seqs=8,
                 max_num_batched_tokens=32, max_model_len=64, max_logprobs=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_tp"))


@pytest.fixture(scope="module")
def tp2(model_dir):
    return LLM(str(model_dir), tensor_parallel_size=2, **ENGINE_KW)


def _check(runner, cfg, num_tokens: int, full_sampler: bool):
    text = runner._executable(*runner._inputs(runner._padding_batch(num_tokens),
                                              full_sampler=full_sampler)).as_text()
    found = parse_collectives(text)
    rows = runner._rows_for(num_tokens)
    return found, unexpected(found, tokens=num_tokens, hidden=cfg.hidden_size, rows=rows,
                             vocab=cfg.vocab_size, num_layers=cfg.num_layers,
                             max_logprobs=runner.max_logprobs)


@pytest.mark.parametrize("full_sampler", [False, True])
def test_engine_decode_step_holds_only_intended_collectives(tp2, full_sampler):
    """The real engine's executable (its placed weights and KV cache) for the decode bucket."""
    tp2.generate(["The capital of France is"],
                 SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    runner, cfg = tp2.llm_engine.runner, tp2.llm_engine.model_config
    found, bad = _check(runner, cfg, runner.bucket_for(1), full_sampler)
    assert not bad, bad
    assert sum(c.op == "all-to-all" for c in found) == 1  # the sampler's rows
    assert not any(c.inside for c in found)


@pytest.mark.parametrize("full_sampler", [False, True])
def test_llama_layout_step_at_tp2_from_shapes(full_sampler):
    """The issue's shape ratios (D 512, 8 q / 2 kv heads, V 32000), compiled from abstract state;
    a gathered lm_head (D x V) or page array would break the size rules."""
    runner, cfg = abstract_runner(dict(TINY), tensor_parallel_size=2, dtype="float32")
    found = parse_collectives(step_hlo(runner, 1, full_sampler))
    assert not unexpected(found, tokens=8, hidden=512, rows=8, vocab=32000, num_layers=2,
                          max_logprobs=runner.max_logprobs)
    assert max(c.nbytes for c in found) <= 8 * 32000 * 4  # the logits, never a weight


def test_check_flags_a_gathered_weight_inside_a_conditional():
    """The parser and the rules against a step that does what issue 19 feared: a weight gathered
    (inside a lax.cond) and an activation all-reduce of the wrong shape."""
    mesh = make_mesh(2)
    w = jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, PartitionSpec(None, "model")))
    x = jax.device_put(jnp.ones((8, 64)), NamedSharding(mesh, PartitionSpec()))

    def step(flag, x, w):
        def gathered():
            return x @ jax.lax.with_sharding_constraint(w, PartitionSpec())

        return jax.lax.cond(flag, gathered, lambda: jnp.zeros((8, 256))), (x @ w).sum()

    with jax.set_mesh(mesh):
        text = jax.jit(step).lower(True, x, w).compile().as_text()
    found = parse_collectives(text)
    gathered = [c for c in found if c.op == "all-gather" and c.num_elements == 64 * 256]
    assert gathered and gathered[0].inside == "conditional", found
    bad = unexpected(found, tokens=8, hidden=64, rows=8, vocab=256, num_layers=0)
    assert any("inside a conditional" in b for b in bad)
    assert any("all-gather f32[64,256]" in b for b in bad), bad


def test_parse_async_start_counts_results_once():
    """XLA:GPU writes async collectives as -start/-done pairs whose start result tuple holds the
    operand then the result; the row counts once with the result's shape."""
    text = """HloModule m

ENTRY %main (p: bf16[8,4096]) -> bf16[16,4096] {
  %p = bf16[8,4096]{1,0} parameter(0)
  %ags = (bf16[8,4096]{1,0}, bf16[16,4096]{1,0}) all-gather-start(%p), dimensions={0}, metadata={op_name="jit(f)/x"}
  ROOT %agd = bf16[16,4096]{1,0} all-gather-done(%ags)
}
"""
    (c,) = parse_collectives(text)
    assert (c.op, c.shapes, c.nbytes, c.op_name, c.inside) == (
        "all-gather", (("bf16", (16, 4096)),), 16 * 4096 * 2, "jit(f)/x", "")


def test_sampling_at_tp2_equals_tp1(model_dir, tp2, caplog):
    """The row-split sampler (jaxserve.sharding.rows_parallel) gives TP=1's tokens and logprobs:
    greedy, seeded random, top-k/top-p/min-p, penalties, allowed ids, logprobs for some rows, and
    a regex (its sampling deferred: the runner's separate sample executable)."""
    regex = StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2}")
    tp1 = LLM(str(model_dir), tensor_parallel_size=1, **ENGINE_KW)
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "你好",
               "The capital of Italy", "small engine"]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=2, max_tokens=8,
                             ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.2, min_p=0.05, seed=3, max_tokens=8, ignore_eos=True,
                             repetition_penalty=1.3, presence_penalty=0.5),
              SamplingParams(temperature=1.0, seed=4, max_tokens=8, ignore_eos=True,
                             allowed_token_ids=list(range(10, 60))),
              SamplingParams(temperature=0.7, top_p=0.5, seed=5, max_tokens=8, ignore_eos=True,
                             frequency_penalty=0.4),
              SamplingParams(temperature=1.5, seed=6, max_tokens=20, structured_outputs=regex)]
    prompts.append("The capital of France is")
    for llm in (tp1, tp2):  # compile the deferred kind first, so the regex row is deferred
        llm.generate(prompts[-1:], params[-1:], use_tqdm=False)
        assert llm.llm_engine.runner.deferred_ready.wait(300)
    assert "warm-up of deferred steps failed" not in caplog.text  # it compiled them all
    want = tp1.generate(prompts, params, use_tqdm=False)
    got = tp2.generate(prompts, params, use_tqdm=False)
    samples = [exe for key, exe in tp2.llm_engine.runner._executables.items()
               if key.kind == "sample"]
    assert samples and not any(c.inside for exe in samples
                               for c in parse_collectives(exe.as_text()))
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        if w.outputs[0].logprobs:
            for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                assert lw.keys() == lg.keys()
                np.testing.assert_allclose([lg[t].logprob for t in lw],
                                           [lw[t].logprob for t in lw], atol=1e-4)
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", got[-1].outputs[0].text)
