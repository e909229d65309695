"""--generation-config: the model's generation_config.json sampling fields are the defaults of
requests that leave them unset (vLLM's "auto"); "vllm" turns that off."""
from __future__ import annotations

import json

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest
from tests.engine.tiny import build_tiny_llama

DEFAULTS = {"temperature": 0.0, "repetition_penalty": 1.8, "top_p": 0.8, "top_k": 20,
            "max_new_tokens": 6}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_tiny_llama(tmp_path_factory.mktemp("tiny_gencfg"))
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, **DEFAULTS}))
    return path


def _llm(model_dir, **kw):
    return LLM(str(model_dir), dtype="float32", page_size=4, num_kv_pages=32, max_num_seqs=4,
               max_num_batched_tokens=32, max_model_len=64, **kw)


def test_auto_applies_the_models_sampling_fields(model_dir):
    llm = _llm(model_dir)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.repetition_penalty, p.top_p, p.top_k, p.max_tokens) == \
        (0.0, 1.8, 0.8, 20, 6)
    prompt = [[5, 6, 7, 5, 6, 7, 5, 6]]
    by_default = llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids
    explicit = SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=6)
    assert by_default == llm.generate(prompt, explicit, use_tqdm=False)[0].outputs[0].token_ids
    assert len(by_default) == 6  # max_new_tokens, not SamplingParams' own 16


def test_vllm_mode_ignores_them(model_dir):
    p = _llm(model_dir, generation_config="vllm").get_default_sampling_params()
    assert (p.temperature, p.repetition_penalty, p.top_p, p.top_k) == (1.0, 1.0, 1.0, 0)


def test_server_requests_take_defaults_only_for_unset_fields():
    defaults = {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05, "max_tokens": 7}
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.2)
    p = chat.sampling_params(max_tokens=chat.max_new_tokens, logprobs=None, defaults=defaults)
    assert (p.temperature, p.top_p, p.repetition_penalty, p.max_tokens) == (0.2, 0.8, 1.05, 7)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                 max_completion_tokens=3)
    p = chat.sampling_params(max_tokens=chat.max_new_tokens, logprobs=None, defaults=defaults)
    assert p.max_tokens == 3
    cmpl = CompletionRequest(prompt="hi", top_p=0.5)
    p = cmpl.sampling_params(max_tokens=cmpl.max_tokens, logprobs=None, defaults=defaults)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.7, 0.5, 7)
