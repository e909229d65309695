"""Registry, config parsing of the shipped presets, dummy loading, and loader errors."""
import jax
import numpy as np
import pytest
from flax import nnx

import models
from jaxserve.weights import load_model
from models.presets import ALIASES, PRESETS, get_preset

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        models.get_model_class("GPT2LMHeadModel")
    with pytest.raises(ValueError, match="FooForCausalLM"):
        models.config_from_hf({**PRESETS["llama-3-8b"], "architectures": ["FooForCausalLM"]})


def test_missing_path():
    with pytest.raises(ValueError, match="/no/such/model"):
        load_model("/no/such/model")


def test_unknown_architecture_in_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(ValueError, match="BertModel"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name, expect", [
    ("llama-3-8b", dict(num_layers=32, hidden_size=4096, num_q_heads=32, num_kv_heads=8,
                        head_dim=128, intermediate_size=14336, vocab_size=128256,
                        rope_theta=500000.0, max_position_embeddings=8192)),
    ("qwen2-7b", dict(num_layers=28, hidden_size=3584, num_q_heads=28, num_kv_heads=4,
                      head_dim=128, intermediate_size=18944, vocab_size=152064, qkv_bias=True)),
    ("qwen2-72b", dict(num_layers=80, hidden_size=8192, num_q_heads=64, num_kv_heads=8,
                       head_dim=128, intermediate_size=29568, vocab_size=152064)),
    ("mistral-7b", dict(num_layers=32, num_kv_heads=8, vocab_size=32000, sliding_window=4096)),
    ("llama-3.1-8b", dict(max_position_embeddings=131072)),
])
def test_preset_configs(name, expect):
    cfg = models.config_from_hf(get_preset(name))
    for field, value in expect.items():
        assert getattr(cfg, field) == value, field
    models.get_model_class(cfg.architecture)


def test_aliases_resolve():
    for alias, name in ALIASES.items():
        assert get_preset(alias) == PRESETS[name]
    assert dict(models.config_from_hf(get_preset("meta-llama/Llama-3.1-8B")).rope_scaling)[
        "rope_type"] == "llama3"


def test_hf_overrides():
    cfg = models.config_from_hf(get_preset("qwen2-72b"), {"num_hidden_layers": 2})
    assert cfg.num_layers == 2 and cfg.hidden_size == 8192


def test_rope_overrides_reach_transformers5_rope_parameters():
    """A 5.x config's rope_parameters win over top-level rope keys: overriding rope_theta or
    rope_scaling must still change the model (it was silently ignored)."""
    hf = {**get_preset("llama-3-8b"), **SMALL}
    hf.pop("rope_scaling", None)
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    hf.pop("rope_theta", None)
    assert models.config_from_hf(hf).rope_theta == 500000.0
    assert models.config_from_hf(hf, {"rope_theta": 1e6}).rope_theta == 1e6
    linear = {"rope_type": "linear", "factor": 2.0}
    cfg = models.config_from_hf(hf, {"rope_scaling": linear})
    assert cfg.rope_theta == 500000.0 and dict(cfg.rope_scaling)["factor"] == 2.0
    nested = {**hf, "rope_parameters": {"full_attention": {"rope_theta": 1e6},
                                        "sliding_attention": {"rope_theta": 1e4}}}
    with pytest.raises(ValueError, match="rope_theta.*per layer type"):
        models.merge_hf_overrides(nested, {"rope_theta": 5.0})


@pytest.mark.parametrize("name", ["mistral-7b", "Qwen/Qwen2-7B"])
def test_dummy_preset_builds(name):
    loaded = load_model(name, load_format="dummy", hf_overrides=SMALL)
    assert loaded.dtype == np.dtype("bfloat16")
    assert loaded.max_model_len == loaded.config.max_position_embeddings
    flat = dict(nnx.to_flat_state(loaded.state))
    q = np.asarray(flat[("layers", 0, "attn", "q_proj")].get_value(), np.float32)
    assert q.shape == (64, 4, 16) and 0 < np.abs(q).max() <= 1e-3
    norm = np.asarray(flat[("final_norm", "scale")].get_value(), np.float32)
    np.testing.assert_array_equal(norm, 1.0)
    assert loaded.tokenizer is not None


def test_dummy_tensor_parallel_sharding():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    loaded = load_model("llama-3-8b", load_format="dummy", hf_overrides=SMALL,
                        tensor_parallel_size=4, dtype="float32")
    assert loaded.config.num_kv_heads == 4 and loaded.config.kv_replication == 2
    k = dict(nnx.to_flat_state(loaded.state))[("layers", 1, "attn", "k_proj")].get_value()
    assert k.shape == (64, 4, 16) and k.sharding.shard_shape(k.shape) == (64, 1, 16)
