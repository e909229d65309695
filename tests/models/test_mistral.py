"""Mistral vs transformers: sliding-window attention with a window (8) shorter than the prompt."""
import pytest
import transformers
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint

from jaxserve.weights import load_model


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    hf = make_hf_model(transformers.MistralConfig, transformers.MistralForCausalLM,
                       sliding_window=8)
    return hf, load_model(save_hf_checkpoint(hf, tmp_path_factory.mktemp("mistral")),
                          dtype="float32")


def test_config(mistral):
    assert mistral[1].config.sliding_window == 8


def test_matches_transformers(mistral):
    # The 20-token prompt and the decode steps attend past the window.
    check_against_hf(*mistral, num_tokens=8)
