"""Gemma 2 vs transformers: GeGLU, (1 + w) norms around attention and MLP, sqrt(D) embedding scale,
attention and final logit soft caps (small, so they bite), query_pre_attn_scalar != head_dim, and a
sliding layer (window 8, shorter than the 20-token prompt) before a global one. transformers runs
its eager attention: its default sdpa path ignores the attention soft cap."""
import pytest
import transformers
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint

from jaxserve.weights import load_model
from models import config_from_hf
from models.gemma2 import GemmaConfig

GEMMA2 = dict(attn_implementation="eager", head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    hf = make_hf_model(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, **GEMMA2)
    return hf, load_model(save_hf_checkpoint(hf, tmp_path_factory.mktemp("gemma2")),
                          dtype="float32")


def test_config(gemma2):
    cfg = gemma2[1].config
    assert isinstance(cfg, GemmaConfig) and cfg.tie_word_embeddings
    assert cfg.layer_types == ("sliding_attention", "full_attention")
    assert (cfg.sliding_window, cfg.attn_logits_soft_cap, cfg.final_logit_soft_cap) == (8, 2.0, 3.0)
    assert cfg.query_pre_attn_scalar == 24 and cfg.rope_local_theta is None
    assert cfg.layer_config(0).sliding_window == 8 and cfg.layer_config(1).sliding_window is None


def test_matches_transformers(gemma2):
    # The 20-token prompt and the decode steps attend past the sliding layer's window.
    check_against_hf(*gemma2, num_tokens=8)


def test_final_soft_cap_bounds_logits(gemma2):
    import jax.numpy as jnp

    from flax import nnx
    loaded = gemma2[1]
    model = nnx.merge(loaded.graphdef, loaded.state)
    logits = model.compute_logits(100.0 * jnp.ones((1, loaded.config.hidden_size)))
    assert float(jnp.abs(logits).max()) <= 3.0


def test_unsupported_options_are_named():
    hf = {"architectures": ["Gemma2ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 1}
    assert config_from_hf(hf).layer_types == ("sliding_attention", "full_attention")
    with pytest.raises(ValueError, match="'relu'"):
        config_from_hf({**hf, "hidden_activation": "relu"})
    with pytest.raises(ValueError, match="bidirectional"):
        config_from_hf({**hf, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="'chunked_attention'"):
        config_from_hf({**hf, "layer_types": ["chunked_attention", "full_attention"]})
