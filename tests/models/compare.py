"""Shared checks of the model tests: a tensor-parallel (sharded) model against the same checkpoint
on one device. (The check against transformers is fixtures.check_against_hf.)"""
import jax
import numpy as np
from fixtures import Driver

TP_PROMPTS = [list(range(3, 23)), [5, 9, 200]]  # 20 tokens and 3 tokens, one ragged batch


def check_sharded_matches_single(sharded, single, prompts=TP_PROMPTS, num_tokens: int = 4,
                                 atol: float = 1e-4) -> None:
    """`sharded` (loaded over its mesh) gives `single`'s prefill logits [len(prompt), V] per
    prompt and decode logits [num_tokens - 1][B, V] to `atol`, and the same greedy tokens."""
    with jax.set_mesh(sharded.mesh):
        got = Driver(sharded, len(prompts)).greedy(prompts, num_tokens)
    want = Driver(single, len(prompts)).greedy(prompts, num_tokens)
    for b in range(len(prompts)):
        np.testing.assert_allclose(got[0][b], want[0][b], atol=atol, rtol=0)
    np.testing.assert_allclose(np.stack(got[1]), np.stack(want[1]), atol=atol, rtol=0)
    assert got[2] == want[2]
