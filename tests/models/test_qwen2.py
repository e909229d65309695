"""Qwen2 vs transformers: q/k/v biases, tied embeddings, YaRN rope scaling."""
import pytest
import transformers
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint

from jaxserve.weights import load_model


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    hf = make_hf_model(transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                       tie_word_embeddings=True)
    return hf, load_model(save_hf_checkpoint(hf, tmp_path_factory.mktemp("qwen2")),
                          dtype="float32")


def test_config(qwen2):
    cfg = qwen2[1].config
    assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.sliding_window is None


def test_matches_transformers(qwen2):
    check_against_hf(*qwen2)


def test_yarn_rope_matches_transformers(tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
            "rope_theta": 10000.0}
    hf = make_hf_model(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, seed=3,
                       rope_parameters=yarn)
    loaded = load_model(save_hf_checkpoint(hf, tmp_path), dtype="float32")
    assert dict(loaded.config.rope_scaling)["rope_type"] == "yarn"
    check_against_hf(hf, loaded, num_tokens=4)
