"""Penalties end to end: the runner's device token history under async scheduling, preemption,
prefix-cache hits, reassigned history rows and n > 1 gives the tokens a naive loop gives."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from tests.engine.tiny import _hf_model, build_tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama_pen"))


@pytest.fixture(scope="module")
def llm(model_dir):
    # 20 pages of 4 tokens for 4 seats: preemption; 4 history rows for more live sequences.
    return LLM(str(model_dir), dtype="float32", page_size=4, num_kv_pages=20, max_num_seqs=4,
               max_num_batched_tokens=16, max_model_len=64)


def naive_greedy(model_dir, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """transformers logits, vLLM's penalties in numpy, argmax: the oracle."""
    import torch

    model, ids = _hf_model(model_dir), list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        out = ids[len(prompt):]
        seen = sorted(set(ids))
        rep = params.repetition_penalty
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / rep, logits[seen] * rep)
        counts = np.bincount(out, minlength=logits.shape[0])
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt):]


def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 60, size=int(rng.integers(2, 20))).tolist() for _ in range(n)]


def test_penalties_match_the_naive_loop_under_async_and_preemption(llm, model_dir):
    prompts = _prompts(9, seed=1) + [list(range(10, 30))] * 2  # the repeat hits the prefix cache
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                             repetition_penalty=[1.0, 1.3, 0.8][i % 3],
                             presence_penalty=[0.0, 0.7, -0.5][(i // 3) % 3],
                             frequency_penalty=[0.4, 0.0, 1.1][i % 3]) for i in range(len(prompts))]
    engine = llm.llm_engine
    # penalties do not switch the async pipeline off (a batch with no masks that follow tokens)
    assert engine.async_scheduling and engine._can_schedule_ahead(SimpleNamespace(seqs=[]))
    hits = engine.scheduler.num_prefix_hit_tokens
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.num_prefix_hit_tokens > hits
    for prompt, p, out in zip(prompts, params, outs):
        assert out.outputs[0].token_ids == naive_greedy(model_dir, prompt, 10, p), p
    engine.scheduler.allocator.check_integrity()


def test_penalty_sampling_async_equals_sync(llm):
    prompts = _prompts(8, seed=2)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=30, seed=i, max_tokens=8, n=1 + i % 2,
                             repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3,
                             ignore_eos=True) for i in range(len(prompts))]
    engine = llm.llm_engine
    try:
        engine.async_scheduling = False
        sync = llm.generate(prompts, params, use_tqdm=False)
    finally:
        engine.async_scheduling = True
    asyn = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(sync, asyn):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert any(len({tuple(c.token_ids) for c in o.outputs}) > 1 for o in asyn if len(o.outputs) > 1)


def test_history_rows_are_reassigned(llm, model_dir):
    """More penalty sequences than rows over time: finished ones give theirs back."""
    runner = llm.llm_engine.runner
    prompts = _prompts(6, seed=3)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, repetition_penalty=1.5)
    for prompt in prompts:  # one at a time: each takes a row, the next reuses a finished one
        out = llm.generate([prompt], p, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == naive_greedy(model_dir, prompt, 4, p)
    assert len(runner.sampling._row_of) + len(runner.sampling._free_rows) == \
        runner.sampling.num_history_rows


def test_prefix_cache_hits_enter_the_history(llm, model_dir):
    """The second run of a prompt computes only its uncached tail; the cached tokens' penalties
    still apply (the runner writes them into the sequence's history row)."""
    base = list(range(40, 52))
    # It would repeat these; 24 of the 25 tokens are cached on the second run.
    prompt = base + naive_greedy(model_dir, base, 12, SamplingParams()) + [7]
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=3.0)
    want = naive_greedy(model_dir, prompt, 6, p)
    engine = llm.llm_engine
    assert want != naive_greedy(model_dir, prompt, 6, SamplingParams(max_tokens=6))
    for _ in range(2):
        hits = engine.scheduler.num_prefix_hit_tokens
        assert llm.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids == want
    assert engine.scheduler.num_prefix_hit_tokens - hits == 24
