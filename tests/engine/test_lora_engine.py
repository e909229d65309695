"""LoRA end to end: tiny Llama and Qwen2 checkpoints with PEFT adapters made here (ranks 8 and 16,
attention and MLP targets, random non-zero B), served by LLM(enable_lora=True): greedy tokens and
logprobs equal transformers + PEFT; a batch mixing adapters and the base model gives each request
what it gets alone (more adapters than slots wait); prefix pages are never shared across
adapters; a merged checkpoint (jaxserve merge-lora) gives the unmerged adapter's logits."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from jaxserve import LLM, LoRARequest, SamplingParams
from tests.fixtures import hf_greedy, hf_logits, make_hf_model, save_hf_checkpoint

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL = ATTN + ["gate_proj", "up_proj", "down_proj"]
NUM_TOKENS = 6


def make_adapter(base, path, *, r: int, seed: int, targets, use_rslora: bool = False):
    """Save a PEFT LoRA of `base` (a copy) with random A and B; -> the torch model with it."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    peft_model = get_peft_model(model, LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, use_rslora=use_rslora))
    torch.manual_seed(seed)
    with torch.no_grad():  # PEFT starts B at zero: a zero delta would prove nothing
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(path)
    return model.eval()  # the base model with PEFT's LoRA layers injected


def _prompts(n: int, seed: int, lengths: tuple[int, int] = (3, 20)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=int(rng.integers(*lengths))).tolist() for _ in range(n)]


def _check(out, torch_model, prompt):
    """Greedy tokens equal transformers(+PEFT)'s; each sampled logprob equals its log_softmax."""
    tokens = out.outputs[0].token_ids
    assert tokens == hf_greedy(torch_model, prompt, NUM_TOKENS)
    logits = hf_logits(torch_model, prompt + tokens).astype(np.float64)
    ref = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, tokens)]
    want = [ref[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)]
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora_llama")
    base = make_hf_model(LlamaConfig, LlamaForCausalLM)
    save_hf_checkpoint(base, root / "base")
    adapters = {  # name -> (LoRARequest, torch model with the adapter)
        "a8": make_adapter(base, root / "a8", r=8, seed=1, targets=ALL),
        "b16": make_adapter(base, root / "b16", r=16, seed=2, targets=ALL, use_rslora=True),
        "c8": make_adapter(base, root / "c8", r=8, seed=3, targets=ATTN),
    }
    reqs = {name: LoRARequest(name, i + 1, str(root / name)) for i, name in enumerate(adapters)}
    # 24 pages of 4 tokens: the mixed batch below needs more, so sequences are preempted (their
    # adapter slots released) and recomputed.
    llm = LLM(str(root / "base"), dtype="float32", enable_lora=True, max_loras=2,
              max_lora_rank=16, page_size=4, num_kv_pages=24, max_num_seqs=8,
              max_num_batched_tokens=32, max_model_len=64)
    return llm, base, adapters, reqs, root


def test_mixed_batch_matches_transformers_peft(llama):
    """Three adapters (two slots: the third waits) and the base model in one generate call,
    under preemption."""
    llm, base, adapters, reqs, _ = llama
    runner = llm.llm_engine.runner
    seen = []
    dispatch = runner.dispatch
    runner.dispatch = lambda batch, *a: (seen.append(batch.lora_slots.copy()),
                                         dispatch(batch, *a))[1]
    try:
        names = ["a8", None, "b16", "c8", "a8", None]
        # three short prompts share the first step; the long ones overflow the page pool
        prompts = _prompts(3, seed=0, lengths=(5, 10)) + _prompts(3, seed=1, lengths=(30, 40))
        params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True,
                                logprobs=1)
        outs = llm.generate(prompts, params, use_tqdm=False,
                            lora_request=[reqs[n] if n else None for n in names])
    finally:
        runner.dispatch = dispatch
    for name, prompt, out in zip(names, prompts, outs):
        _check(out, adapters[name] if name else base, prompt)
    # One step held two adapters and base tokens together; never more adapters than slots.
    distinct = [set(s[s < 2].tolist()) for s in seen]
    assert any(len(d) == 2 and (s >= 2).any() for d, s in zip(distinct, seen))
    assert all(len(d) <= 2 for d in distinct)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    llm.llm_engine.scheduler.lora_slots.check_integrity()


def test_prefix_cache_not_shared_across_adapters(llama):
    llm, base, adapters, reqs, _ = llama
    sched = llm.llm_engine.scheduler
    prompt = list(range(30, 50))  # 20 tokens: 4 full pages of 4 are cacheable
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1)
    hits = []
    for name in ["a8", "b16", None, "a8"]:
        before = sched.num_prefix_hit_tokens
        out = llm.generate([prompt], params, use_tqdm=False,
                           lora_request=reqs[name] if name else None)[0]
        hits.append(sched.num_prefix_hit_tokens - before)
        _check(out, adapters[name] if name else base, prompt)
    assert hits[:3] == [0, 0, 0] and hits[3] == 16  # only a8's second run reuses a8's pages


def test_bad_lora_requests(llama, tmp_path):
    llm, _, _, reqs, root = llama
    with pytest.raises(ValueError, match="nowhere"):
        llm.generate([[5, 6]], lora_request=LoRARequest("x", 9, str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="already adapter 'a8'"):
        llm.generate([[5, 6]], lora_request=LoRARequest("other", 1, str(root / "a8")))
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("x", 0, str(root / "a8"))
    assert not llm.llm_engine.has_unfinished_requests()


def test_qwen2_adapter_and_merge(tmp_path):
    """Qwen2 (q/k/v biases) with a rank-16 adapter on every projection; the merged checkpoint
    served without LoRA gives the adapter's tokens and logprobs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base = make_hf_model(Qwen2Config, Qwen2ForCausalLM, seed=4)
    save_hf_checkpoint(base, tmp_path / "base")
    torch_model = make_adapter(base, tmp_path / "q16", r=16, seed=5, targets=ALL)
    from jaxserve.cli import main

    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "q16"),
                 str(tmp_path / "merged")]) == 0
    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "q16"),
                 str(tmp_path / "merged")]) == 2  # refuses to overwrite
    prompts = _prompts(3, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1)
    kw = dict(dtype="float32", page_size=4, num_kv_pages=64, max_num_seqs=4,
              max_num_batched_tokens=32, max_model_len=64)
    llm = LLM(str(tmp_path / "base"), enable_lora=True, max_lora_rank=16, **kw)
    outs = llm.generate(prompts, params, use_tqdm=False,
                        lora_request=LoRARequest("q16", 1, str(tmp_path / "q16")))
    for prompt, out in zip(prompts, outs):
        _check(out, torch_model, prompt)
    merged_llm = LLM(str(tmp_path / "merged"), **kw)
    for prompt, out in zip(prompts, merged_llm.generate(prompts, params, use_tqdm=False)):
        _check(out, torch_model, prompt)
    with pytest.raises(ValueError, match="needs enable_lora=True"):
        merged_llm.generate(prompts[:1], lora_request=LoRARequest("q16", 1, str(tmp_path / "q16")))


def test_tensor_parallel_lora(llama):
    """2-way tensor parallel: A/B split with their base weights, same tokens and logprobs."""
    _, base, adapters, reqs, root = llama
    llm = LLM(str(root / "base"), dtype="float32", enable_lora=True, max_loras=2,
              max_lora_rank=16, tensor_parallel_size=2, page_size=4, num_kv_pages=32,
              max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    state = llm.llm_engine.runner.state
    b = state["layers"][0]["attn"]["q_lora"]["b"].get_value()
    assert b.sharding.spec[2] == "model"  # [S, R, N, H] split on heads like q_proj
    names = ["b16", None, "a8"]
    prompts = _prompts(len(names), seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False,
                        lora_request=[reqs[n] if n else None for n in names])
    for name, prompt, out in zip(names, prompts, outs):
        _check(out, adapters[name] if name else base, prompt)
    assert llm.llm_engine.runner.state["layers"][0]["attn"]["q_lora"]["b"].get_value() \
        .sharding.spec[2] == "model"  # still split after the slot writes
