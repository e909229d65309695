"""Scheduler tests with a fake runner: batching, chunked prefill, preemption, prefix caching, stops."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_runner import (EOS, FakeRunner, check_batch_limits, make_request,
                         reference_generate)
from jaxserve.request import Status
from jaxserve.scheduler import Scheduler


def make(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=64,
         max_model_len=128, enable_prefix_caching=True, token_fn=None):
    sched = Scheduler(num_pages=num_pages, page_size=page_size, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                      enable_prefix_caching=enable_prefix_caching)
    return sched, FakeRunner(sched.allocator, token_fn)


def step(sched, runner):
    """One engine step; checks invariants. Returns (batch, update outputs)."""
    batch = sched.schedule()
    assert batch is not None, "unfinished work but nothing scheduled"
    check_batch_limits(batch, sched.max_num_seqs, sched.max_num_batched_tokens)
    out = sched.update(batch, runner.execute(batch))
    sched.allocator.check_integrity()
    return batch, out


def run_all(sched, runner, max_steps=10_000):
    batches, finished = [], []
    while sched.has_unfinished():
        assert len(batches) < max_steps, "livelock"
        batch, out = step(sched, runner)
        batches.append(batch)
        finished += [s for s in out if s.is_finished]
    assert sched.allocator.num_free_pages == sched.allocator.num_pages
    assert len(set(map(id, finished))) == len(finished), "sequence finished twice"
    return batches, finished


def add_all(sched, seqs):
    for seq in seqs:
        sched.add(seq)
    return seqs


def test_prefill_then_decode_batch_fields():
    sched, runner = make(page_size=4)
    (seq,) = add_all(sched, make_request("a", [10, 11, 12, 13, 14, 15], max_tokens=3))
    batch = sched.schedule()
    pages = seq.page_ids
    assert len(pages) == 2 and batch.seqs == [seq]
    assert batch.token_ids.tolist() == [10, 11, 12, 13, 14, 15]
    assert batch.positions.tolist() == list(range(6))
    assert batch.slot_mapping.tolist() == [pages[p // 4] * 4 + p % 4 for p in range(6)]
    assert batch.cu_q_lens.tolist() == [0, 6] and batch.kv_lens.tolist() == [6]
    assert batch.page_table.tolist() == [pages] and batch.sample_mask.tolist() == [True]
    assert (batch.num_prefill_tokens, batch.num_decode_tokens) == (6, 0)
    assert sched.update(batch, runner.execute(batch)) == [seq]
    batch = sched.schedule()  # decode: the sampled token is the one chunk token
    assert batch.token_ids.tolist() == [seq.output_token_ids[0]] and batch.positions.tolist() == [6]
    assert (batch.num_prefill_tokens, batch.num_decode_tokens) == (0, 1)
    sched.update(batch, runner.execute(batch))
    run_all(sched, runner)
    assert seq.output_token_ids == reference_generate(seq.prompt_token_ids, 0, 3, 128)
    assert seq.finish_reason == "length" and seq.status is Status.FINISHED and seq.page_ids == []


def test_chunked_prefill_respects_budget():
    sched, runner = make(page_size=4, max_num_batched_tokens=16)
    long = add_all(sched, make_request("long", list(range(50)), max_tokens=4))[0]
    short = add_all(sched, make_request("short", [1, 2, 3], max_tokens=4))[0]
    batch, _ = step(sched, runner)
    assert batch.seqs == [long] and batch.num_tokens == 16 and not batch.sample_mask[0]
    assert len(long.page_ids) == 4 and not long.output_token_ids
    for expect_pages in (8, 12):
        batch, _ = step(sched, runner)
        assert batch.seqs == [long] and batch.num_tokens == 16 and len(long.page_ids) == expect_pages
    batch, _ = step(sched, runner)  # the last 2 prompt tokens, then the short prompt joins
    assert batch.seqs == [long, short] and batch.cu_q_lens.tolist() == [0, 2, 5]
    assert batch.sample_mask.tolist() == [True, True]
    batch, _ = step(sched, runner)  # two decodes
    assert batch.num_decode_tokens == 2 and batch.num_prefill_tokens == 0
    run_all(sched, runner)
    for seq in (long, short):
        assert seq.output_token_ids == reference_generate(seq.prompt_token_ids, 0, 4, 128)


def test_max_num_seqs_limits_running():
    sched, runner = make(max_num_seqs=2)
    seqs = [add_all(sched, make_request(str(i), [i, i + 1], max_tokens=5))[0] for i in range(5)]
    batches, finished = run_all(sched, runner)
    assert max(b.num_seqs for b in batches) == 2
    assert {id(s) for s in finished} == {id(s) for s in seqs}


def run_workload(num_pages, max_num_batched_tokens, enable_prefix_caching=True):
    sched, runner = make(num_pages=num_pages, page_size=4, max_num_seqs=8,
                         max_num_batched_tokens=max_num_batched_tokens, max_model_len=64,
                         enable_prefix_caching=enable_prefix_caching)
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(10):
        prompt = rng.integers(0, 50, size=int(rng.integers(1, 30))).tolist()
        seqs += add_all(sched, make_request(str(i), prompt, max_tokens=int(rng.integers(1, 25))))
    run_all(sched, runner)
    return sched, seqs


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preemption_gives_same_tokens(enable_prefix_caching):
    big, big_seqs = run_workload(1024, 512, enable_prefix_caching)
    small, small_seqs = run_workload(16, 24, enable_prefix_caching)
    assert big.num_preemptions == 0 and small.num_preemptions > 0
    for a, b in zip(big_seqs, small_seqs):
        assert a.output_token_ids == b.output_token_ids
        assert len(b.output_token_ids) == b.params.max_tokens and b.finish_reason == "length"
        assert a.output_token_ids == reference_generate(a.prompt_token_ids, 0, a.params.max_tokens, 64)


def test_preempted_sequence_goes_to_front_of_waiting():
    sched, runner = make(num_pages=4, page_size=2, max_model_len=8, max_num_seqs=2)
    a = add_all(sched, make_request("a", [1, 2, 3], max_tokens=4))[0]
    b = add_all(sched, make_request("b", [4, 5, 6], max_tokens=4))[0]
    c = add_all(sched, make_request("c", [7], max_tokens=4))[0]
    step(sched, runner)  # a and b prefilled: 2 pages each, pool full; c has no seat
    batch, _ = step(sched, runner)  # both decode within their pages
    batch, _ = step(sched, runner)  # a needs a third page: b (latest arrival) is preempted
    assert batch.seqs == [a] and b.status is Status.WAITING and list(sched.waiting) == [b, c]
    assert b.num_computed_tokens == 0 and b.page_ids == [] and len(b.output_token_ids) == 2
    run_all(sched, runner)
    assert b.output_token_ids == reference_generate([4, 5, 6], 0, 4, 8)
    assert c.output_token_ids == reference_generate([7], 0, 4, 8)


def test_prefix_cache_hit_on_shared_prompt():
    prompt = list(range(40))
    sched, runner = make(page_size=4)
    first = add_all(sched, make_request("a", prompt, max_tokens=2))[0]
    run_all(sched, runner)
    computed = runner.num_computed
    second = add_all(sched, make_request("b", prompt, max_tokens=2))[0]
    run_all(sched, runner)
    assert second.num_cached_prompt_tokens == 36  # 9 full pages; the 10th keeps one token to run
    assert runner.num_computed - computed == computed - 36
    assert second.output_token_ids == first.output_token_ids
    assert sched.prefix_cache_hit_rate > 0


def test_siblings_share_parent_pages():
    sched, runner = make(page_size=4, max_num_batched_tokens=8)
    seqs = add_all(sched, make_request("r", list(range(21)), n=3, max_tokens=5))
    batch, _ = step(sched, runner)
    assert batch.seqs == [seqs[0]]  # siblings wait for the parent's prompt
    while seqs[0].in_prefill:
        batch, _ = step(sched, runner)
        assert all(s.status is Status.WAITING for s in seqs[1:])
    batch, _ = step(sched, runner)
    assert set(map(id, batch.seqs)) == set(map(id, seqs))
    for s in seqs[1:]:
        assert s.num_cached_prompt_tokens == 20 and s.page_ids[:5] == seqs[0].page_ids[:5]
    assert all(sched.allocator.ref_count(p) == 3 for p in seqs[0].page_ids[:5])
    run_all(sched, runner)
    for s in seqs:
        assert s.output_token_ids == reference_generate(s.prompt_token_ids, s.index, 5, 128)
    assert seqs[1].output_token_ids != seqs[2].output_token_ids


def test_abort_frees_pages():
    sched, runner = make(max_num_seqs=1)
    running = add_all(sched, make_request("a", list(range(10)), n=2, max_tokens=50))
    waiting = add_all(sched, make_request("b", [1, 2], max_tokens=3))[0]
    step(sched, runner)
    assert sched.kv_cache_usage > 0
    aborted = sched.abort("a")
    assert set(map(id, aborted)) == set(map(id, running)) and sched.abort("a") == []
    assert all(s.finish_reason == "abort" and s.page_ids == [] for s in running)
    assert sched.kv_cache_usage == 0 and sched.num_running == 0 and sched.num_waiting == 1
    run_all(sched, runner)
    assert waiting.finish_reason == "length"


def test_finish_between_schedule_and_update():
    sched, runner = make()
    (seq,) = add_all(sched, make_request("a", [1, 2, 3], max_tokens=5))
    batch = sched.schedule()
    tokens = runner.execute(batch)
    sched.finish(seq, "stop", "</s>")
    assert sched.update(batch, tokens) == []
    assert seq.output_token_ids == [] and seq.stop_reason == "</s>" and not sched.has_unfinished()
    sched.allocator.check_integrity()


def scripted(tokens):
    """Token fn emitting tokens[i] as the i-th output token."""
    return lambda seq, history: tokens[len(history) - seq.num_prompt_tokens]


@pytest.mark.parametrize("params, out, reason, stop_reason", [
    (dict(max_tokens=10), [5, 6, EOS], "stop", None),
    (dict(max_tokens=5, ignore_eos=True), [5, 6, EOS, 7, EOS], "length", None),
    (dict(max_tokens=10, min_tokens=4), [5, 6, EOS, 7, EOS], "stop", None),
    (dict(max_tokens=10, stop_token_ids=[6]), [5, 6], "stop", 6),
    (dict(max_tokens=10, stop_token_ids=[6], ignore_eos=True), [5, 6], "stop", 6),
    (dict(max_tokens=10, min_tokens=2, stop_token_ids=[5], ignore_eos=True),
     [5, 6, EOS, 7, EOS, 5], "stop", 5),
    (dict(max_tokens=None, ignore_eos=True), [5, 6, EOS, 7, EOS, 5, 8, 9], "length", None),
    (dict(max_tokens=10, min_tokens=9, ignore_eos=True), [5, 6, EOS, 7, EOS, 5, 8, 9], "length", None),
])
def test_stop_conditions(params, out, reason, stop_reason):
    tokens = [5, 6, EOS, 7, EOS, 5, 8, 9, 10, 11, 12]
    sched, runner = make(token_fn=scripted(tokens), max_model_len=12)  # 4 prompt + 8 output
    (seq,) = add_all(sched, make_request("a", [1, 2, 3, 4], **params))
    run_all(sched, runner)
    assert seq.output_token_ids == out
    assert (seq.finish_reason, seq.stop_reason) == (reason, stop_reason)


def test_prompt_logprobs_bypass_prefix_cache():
    sched, runner = make()
    add_all(sched, make_request("a", list(range(20)), max_tokens=1))
    run_all(sched, runner)
    (seq,) = add_all(sched, make_request("b", list(range(20)), max_tokens=1, prompt_logprobs=1))
    run_all(sched, runner)
    assert seq.num_cached_prompt_tokens == 0


def test_sequence_must_fit_the_pool_alone():
    sched, runner = make(num_pages=3, page_size=4, max_model_len=100)
    add_all(sched, make_request("ok", [1] * 8, max_tokens=5))  # at most 12 slots
    with pytest.raises(AssertionError, match="does not fit"):
        add_all(sched, make_request("big", [1] * 8, max_tokens=6))
    run_all(sched, runner)


# ---- property test: random arrivals, pool sizes, budgets and aborts ---------------------------
@st.composite
def scenarios(draw):
    page_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(4, 40))
    shared = draw(st.lists(st.integers(0, 9), max_size=max_model_len))
    requests = []
    for i in range(draw(st.integers(1, 7))):
        prefix = shared[:draw(st.integers(0, len(shared)))]
        prompt = (prefix + draw(st.lists(st.integers(0, 9), min_size=1, max_size=12)))
        requests.append(dict(
            request_id=str(i), prompt=prompt[:max_model_len], n=draw(st.integers(1, 3)),
            max_tokens=draw(st.integers(1, 12)), arrival=draw(st.integers(0, 15)),
            abort=draw(st.none() | st.integers(0, 30)), abort_in_flight=draw(st.booleans())))
    # The smallest pool in which every request fits alone (Scheduler.add asserts it).
    min_pages = max(-(-min(len(r["prompt"]) + r["max_tokens"] - 1,
                           max(max_model_len - 1, len(r["prompt"]))) // page_size)
                    for r in requests)
    cfg = dict(page_size=page_size, max_model_len=max_model_len,
               num_pages=draw(st.integers(min_pages, min_pages + 2)  # tight pools preempt
                              | st.integers(min_pages, 3 * min_pages)),
               max_num_batched_tokens=draw(st.integers(1, 48)),
               max_num_seqs=draw(st.integers(1, 8)),
               enable_prefix_caching=draw(st.booleans()))
    return cfg, requests


def run_scenario(cfg, requests):
    sched, runner = make(**cfg)
    seqs, aborted, finished, step_idx = {}, set(), [], 0
    while sched.has_unfinished() or any(r["arrival"] >= step_idx for r in requests):
        assert step_idx < 2000, "livelock"
        for r in requests:
            if r["arrival"] == step_idx:
                seqs[r["request_id"]] = add_all(sched, make_request(
                    r["request_id"], r["prompt"], n=r["n"], max_tokens=r["max_tokens"]))
            if r["abort"] == step_idx and not r["abort_in_flight"]:
                aborted.add(r["request_id"])
                finished += sched.abort(r["request_id"])
        batch = sched.schedule()
        if batch is not None:
            check_batch_limits(batch, cfg["max_num_seqs"], cfg["max_num_batched_tokens"])
            tokens = runner.execute(batch)
            for r in requests:  # an abort arriving while the step runs
                if r["abort"] == step_idx and r["abort_in_flight"]:
                    aborted.add(r["request_id"])
                    finished += sched.abort(r["request_id"])
            finished += [s for s in sched.update(batch, tokens) if s.is_finished]
        else:
            assert not sched.has_unfinished()
        sched.allocator.check_integrity()
        step_idx += 1
    return sched, seqs, aborted, finished


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads(scenario):
    cfg, requests = scenario
    sched, seqs, aborted, finished = run_scenario(cfg, requests)
    all_seqs = [s for group in seqs.values() for s in group]
    assert sorted(map(id, finished)) == sorted(map(id, all_seqs)), "lost or duplicated sequence"
    for seq in all_seqs:
        assert seq.is_finished and seq.page_ids == []
        expected = reference_generate(seq.prompt_token_ids, seq.index, seq.params.max_tokens,
                                      cfg["max_model_len"])
        if seq.finish_reason == "abort":
            assert seq.request_id in aborted
            assert seq.output_token_ids == expected[:len(seq.output_token_ids)]
        else:
            assert seq.output_token_ids == expected and seq.finish_reason == "length"
    assert sched.allocator.num_free_pages == cfg["num_pages"]
    assert all(sched.allocator.ref_count(p) == 0 for p in range(cfg["num_pages"]))
