"""Llama vs transformers on a tiny random checkpoint: llama3 rope scaling, tied embeddings,
sharded safetensors, and tensor parallelism with KV-head replication on the fake CPU devices."""
import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from compare import check_sharded_matches_single
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint

from jaxserve.sharding import make_mesh
from jaxserve.weights import load_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = make_hf_model(transformers.LlamaConfig, transformers.LlamaForCausalLM,
                       rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    return hf, save_hf_checkpoint(hf, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def loaded(llama):
    return load_model(llama[1], dtype="float32")


def test_config(loaded):
    cfg = loaded.config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3"
    assert loaded.max_model_len == 256 and loaded.eos_token_ids >= {2}
    assert loaded.tokenizer("t5 t7")["input_ids"] == [5, 7]


def test_matches_transformers(llama, loaded):
    check_against_hf(llama[0], loaded)


def test_tied_embeddings(tmp_path):
    hf = make_hf_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed=1,
                       tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})
    loaded = load_model(save_hf_checkpoint(hf, tmp_path), dtype="float32")
    assert loaded.config.tie_word_embeddings
    assert ("lm_head",) not in dict(nnx.to_flat_state(loaded.state))
    check_against_hf(hf, loaded, num_tokens=4)


def test_sharded_safetensors_load_identically(llama, loaded, tmp_path):
    path = save_hf_checkpoint(llama[0], tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = load_model(path, dtype="float32")
    a = jax.tree.leaves(loaded.state)
    b = jax.tree.leaves(sharded.state)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_single_device(llama, loaded, tp):
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    sharded = load_model(llama[1], dtype="float32", tensor_parallel_size=tp, mesh=make_mesh(tp))
    assert sharded.config.num_kv_heads == max(2, tp)
    assert sharded.config.kv_replication == max(1, tp // 2)
    q = dict(nnx.to_flat_state(sharded.state))[("layers", 0, "attn", "q_proj")].get_value()
    assert len(q.sharding.device_set) == tp
    check_sharded_matches_single(sharded, loaded)


def test_bfloat16_checkpoint_auto_dtype(llama, tmp_path):
    import copy

    import torch

    hf_bf16 = copy.deepcopy(llama[0]).to(torch.bfloat16)  # the fixture model stays f32
    loaded = load_model(save_hf_checkpoint(hf_bf16, tmp_path))
    want = hf_bf16.state_dict()["model.layers.0.mlp.down_proj.weight"].float().numpy().T
    assert loaded.dtype == np.dtype("bfloat16")
    got = dict(nnx.to_flat_state(loaded.state))[("layers", 0, "mlp", "down_proj")].get_value()
    assert got.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)
