"""End to end: LLM.generate on a tiny random Llama equals a naive transformers loop, under chunked
prefill, preemption and prefix caching; sampling, stops, logprobs and errors behave like vLLM."""
from __future__ import annotations

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from tests.engine.tiny import build_tiny_llama, hf_greedy, hf_logprobs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def llm(model_dir):
    # 24 pages of 4 tokens = 96 slots: far fewer than the batch below needs, forcing preemption.
    return LLM(str(model_dir), dtype="float32", page_size=4, num_kv_pages=24, max_num_seqs=8,
               max_num_batched_tokens=32, max_model_len=64)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 380, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def test_greedy_matches_transformers_under_preemption(llm, model_dir):
    prompts = _prompts(12)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    sched = llm.llm_engine.scheduler
    assert sched.num_preemptions > 0, "the small page pool should have forced preemption"
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, 12)
        assert out.outputs[0].finish_reason == "length"
    sched.allocator.check_integrity()
    assert sched.allocator.num_free_pages == llm.llm_engine.num_kv_pages


def test_no_recompile_after_warmup(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm.generate(_prompts(6, seed=1), params, use_tqdm=False)
    runner = llm.llm_engine.runner
    compiles, cache = runner.num_compiles, runner.jit_cache_size
    llm.generate(_prompts(6, seed=1), params, use_tqdm=False)
    assert (runner.num_compiles, runner.jit_cache_size) == (compiles, cache)


def test_seed_gives_same_text_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=7, ignore_eos=True)
    alone = llm.generate(["The capital of France is"], p, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    mixed = llm.generate(["Once upon a time", "The capital of France is", "def add"],
                         [other, p, other], use_tqdm=False)[1].outputs[0].token_ids
    assert alone == mixed
    unseeded = llm.generate(["The capital of France is"] * 2,
                            SamplingParams(temperature=1.0, max_tokens=10), use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_n_completions_share_the_prompt(llm):
    prompt = list(range(10, 40))  # 30 tokens: 7 full pages of 4
    sched = llm.llm_engine.scheduler
    hits_before = sched.num_prefix_hit_tokens
    outs = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=3,
                                                 ignore_eos=True), use_tqdm=False)
    # The two siblings found the first completion's 7 full prompt pages in the prefix cache.
    assert sched.num_prefix_hit_tokens - hits_before >= 2 * 28
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in comps}) > 1
    assert all(len(c.token_ids) == 8 for c in comps)


def test_stop_conditions(llm, model_dir):
    prompt = _prompts(1, seed=5)[0]
    ref = hf_greedy(model_dir, prompt, 10)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10,
                                                stop_token_ids=[ref[3]]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == ref[:ref.index(ref[3]) + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", ref[3])
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if stop.strip():
        cut = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop=[stop],
                                                    ignore_eos=True), use_tqdm=False)[0].outputs[0]
        assert cut.finish_reason == "stop" and cut.stop_reason == stop
        assert cut.text == full[:full.index(stop)]


def test_min_tokens_bans_stop_tokens(llm, model_dir):
    prompt = _prompts(1, seed=6)[0]
    first = hf_greedy(model_dir, prompt, 1)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, min_tokens=3,
                                                stop_token_ids=[first]), use_tqdm=False)[0]
    ids = out.outputs[0].token_ids
    assert first not in ids[:3] and len(ids) >= 3  # banned while fewer than min_tokens are out


def test_logprobs_match_transformers(llm, model_dir):
    prompt = _prompts(1, seed=9)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                prompt_logprobs=2, ignore_eos=True),
                       use_tqdm=False)[0]
    comp = out.outputs[0]
    ref = hf_logprobs(model_dir, prompt + comp.token_ids)
    for i, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert entry[token].logprob == pytest.approx(row[token], abs=1e-4)
        assert entry[token].rank == 1
        top = np.argsort(-row)[:3]
        assert set(entry) >= set(int(t) for t in top)
        tok = llm.get_tokenizer()
        for t, lp in entry.items():  # vLLM's Logprob.decoded_token: the token's own text
            assert lp.decoded_token == tok.decode([t], skip_special_tokens=False)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(ref[p - 1][prompt[p]],
                                                                           abs=1e-4)
        assert out.prompt_logprobs[p][prompt[p]].decoded_token is not None


def test_sampled_logprobs_ranks_and_lengths(llm, model_dir):
    """Sampled tokens outside the top-k get their whole-vocabulary rank; one entry per output
    token (also when a stop token ends the sequence while a speculative step ran); the
    cumulative logprob is their sum; a streamed output's logprobs stay as they were sent."""
    prompt = _prompts(1, seed=12)[0]
    first = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    params = SamplingParams(temperature=1.5, max_tokens=12, logprobs=1, seed=3, ignore_eos=True)
    comp = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    ref = hf_logprobs(model_dir, prompt + comp.token_ids)
    ranks = [int((ref[len(prompt) - 1 + i] > ref[len(prompt) - 1 + i][t]).sum()) + 1
             for i, t in enumerate(comp.token_ids)]
    assert [entry[t].rank for entry, t in zip(comp.logprobs, comp.token_ids)] == ranks
    assert max(ranks) > 1  # some draws were not the top-1, which has its own entry
    assert comp.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for e, t in zip(comp.logprobs, comp.token_ids)), abs=1e-4)
    stopped = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=2,
                                                    stop_token_ids=[first[1]]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == first[:2] and len(stopped.logprobs) == 2
    engine = llm.llm_engine
    engine.add_request("stream-lp", prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=2,
                                                           ignore_eos=True))
    sent = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            sent.append((len(out.outputs[0].token_ids), out.outputs[0].logprobs))
    assert [len(lp) for _, lp in sent] == [n for n, _ in sent] == [1, 2, 3, 4]
    assert sent[0][1][0] == sent[-1][1][0] and sent[-1][1][1:] == sent[-1][1][1:4]


def test_repetition_penalty_matches_transformers(llm, model_dir):
    prompt = _prompts(1, seed=11)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                repetition_penalty=1.5), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt, 8, repetition_penalty=1.5)


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=3),
                   use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>user\nhi<|im_end|>")
    assert out.prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n"), (dict(min_p=2), "min_p"), (dict(logprobs=-2), "logprobs"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_leave_the_engine_serving(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 65], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[5, 100000]], SamplingParams(max_tokens=1), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate(["hi"], SamplingParams(max_tokens=1, logprobs=1000), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs=-1 asks for the whole vocabulary"):
        llm.generate(["hi"], SamplingParams(max_tokens=1, logprobs=-1), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    out = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1


def test_bad_engine_arguments(model_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(str(model_dir), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="does-not-exist"):
        LLM("/does-not-exist/model")
    with pytest.raises(ValueError, match="bogus"):
        LLM(str(model_dir), bogus=1)


def test_tensor_parallel_matches_single_device(model_dir, llm):
    prompts = _prompts(4, seed=13)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tp = LLM(str(model_dir), dtype="float32", tensor_parallel_size=4, page_size=4,
             num_kv_pages=64, max_model_len=64)
    got = [o.outputs[0].token_ids for o in tp.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want


def test_async_scheduling_gives_the_same_outputs(llm):
    prompts = _prompts(10, seed=21)
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=int(4 + i % 5), seed=i,
                             min_tokens=i % 3, stop=["e"] if i % 4 == 0 else None)
              for i in range(len(prompts))]
    engine = llm.llm_engine
    runner = engine.runner
    dispatch, fetch = runner.dispatch, runner.fetch
    in_flight = {"now": 0, "max": 0}

    def counting_dispatch(batch, *args):
        in_flight["now"] += 1
        in_flight["max"] = max(in_flight["max"], in_flight["now"])
        return dispatch(batch, *args)

    def counting_fetch(handle):
        in_flight["now"] -= 1
        return fetch(handle)

    runner.dispatch, runner.fetch = counting_dispatch, counting_fetch
    try:
        engine.async_scheduling = False
        sync = llm.generate(prompts, params, use_tqdm=False)
        assert in_flight["max"] == 1
        engine.async_scheduling = True
        asyn = llm.generate(prompts, params, use_tqdm=False)
        assert in_flight["max"] == 2  # step n+1 was dispatched before step n was read
    finally:
        runner.dispatch, runner.fetch = dispatch, fetch
    for a, b in zip(sync, asyn):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert (a.outputs[0].text, a.outputs[0].finish_reason) == (b.outputs[0].text,
                                                                  b.outputs[0].finish_reason)
    engine.scheduler.allocator.check_integrity()


def test_warmup_compiles_every_step_shape_of_both_sampler_variants(model_dir, llm):
    """Warm-up compiles every step shape and runs each once on padding: nothing compiles later,
    and the padding runs leave no trace (same greedy text as an engine without warm-up)."""
    reference = llm
    llm = LLM(str(model_dir), dtype="float32", page_size=4, num_kv_pages=64, max_num_seqs=8,
              max_num_batched_tokens=32, max_model_len=64)
    runner = llm.llm_engine.runner
    runner.full_width_page_table = True  # as with the Pallas kernels on an accelerator
    runner.warmup()
    # the padding runs wrote nothing into the (zero-initialised) pages
    assert all(not np.asarray(x).any() for x in runner.kv_cache.k + runner.kv_cache.v)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = _prompts(4, seed=3)
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in reference.generate(prompts, greedy,
                                                                  use_tqdm=False)])
    compiled = runner.num_compiles
    assert compiled == 2 * len(runner.buckets)  # plain and full sampler
    # XLA's measured temporaries of the largest step (logged next to the pool's reserve): at
    # least one step's f32 [8, V] logits
    assert runner.peak_temp_bytes >= 8 * llm.llm_engine.model_config.vocab_size * 4
    settings = [dict(temperature=0.7), dict(temperature=0), dict(temperature=0.7, top_p=0.9),
                dict(temperature=0.7, top_k=5, min_p=0.1, repetition_penalty=1.1),
                dict(temperature=0, logprobs=3), dict(temperature=0, presence_penalty=0.5)]
    for i, kw in enumerate(settings):
        llm.generate(_prompts(8, seed=17 + i), SamplingParams(max_tokens=6, ignore_eos=True, **kw),
                     use_tqdm=False)
    assert runner.num_compiles == compiled, "a step shape was compiled after warm-up"


def test_reset_prefix_cache_forgets_finished_prompts(llm):
    prompt = list(range(300, 322))  # 5 full pages of 4 tokens, tokens no other test uses
    params = SamplingParams(temperature=0.0, max_tokens=2)
    llm.generate([prompt], params, use_tqdm=False)
    assert llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens > 0
    assert llm.reset_prefix_cache()
    assert llm.generate([prompt], params, use_tqdm=False)[0].num_cached_tokens == 0


def test_delta_outputs_add_up_to_the_cumulative_ones(llm):
    """output_kind=DELTA (vLLM): each output carries only the new tokens, text and logprobs;
    concatenated they equal the final CUMULATIVE output, for both of n=2's completions."""
    from jaxserve.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    prompt = _prompts(1, seed=21)[0]
    outs = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA):
        engine.add_request(f"kind-{kind.name}", prompt, SamplingParams(
            temperature=1.0, seed=4, n=2, max_tokens=7, logprobs=1, ignore_eos=True,
            output_kind=kind))
        seen = []
        while engine.has_unfinished_requests():
            seen += engine.step()
        outs[kind] = seen
    final = {c.index: c for c in outs[RequestOutputKind.CUMULATIVE][-1].outputs}
    deltas = [c for o in outs[RequestOutputKind.DELTA] for c in o.outputs]
    for i in (0, 1):
        mine = [c for c in deltas if c.index == i]
        assert len(mine) > 2 and all(len(c.token_ids) <= 1 for c in mine)
        assert sum((c.token_ids for c in mine), []) == final[i].token_ids
        assert "".join(c.text for c in mine) == final[i].text
        assert sum((list(c.logprobs) for c in mine), []) == list(final[i].logprobs)
        assert mine[-1].finish_reason == "length"
