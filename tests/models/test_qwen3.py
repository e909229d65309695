"""Qwen3 vs transformers: q/k RMSNorm over head_dim and head_dim (32) != hidden / heads (16)."""
import pytest
import transformers
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint

from jaxserve.weights import load_model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    hf = make_hf_model(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=32)
    return hf, load_model(save_hf_checkpoint(hf, tmp_path_factory.mktemp("qwen3")),
                          dtype="float32")


def test_config(qwen3):
    cfg = qwen3[1].config
    assert cfg.qk_norm and cfg.head_dim == 32 and cfg.hidden_size == 64


def test_matches_transformers(qwen3):
    check_against_hf(*qwen3)
