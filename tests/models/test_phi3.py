"""Phi-3 vs transformers on tiny random checkpoints: fused qkv_proj / gate_up_proj split at load,
LongRoPE with both factor sets (chosen by the served context), a sliding window shorter than the
prompt, and Phi-4-mini's partial rotary factor."""
import numpy as np
import pytest
import transformers
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint

from jaxserve.weights import load_model
from models import config_from_hf
from models.layers import longrope_for_context, rope_frequencies

ORIGINAL_MAX = 16  # LongRoPE's pretraining length; TINY's max_position_embeddings is 256


def _longrope():
    rng = np.random.default_rng(0)
    return {"rope_type": "longrope", "short_factor": (1 + rng.random(8)).tolist(),
            "long_factor": (2 + 4 * rng.random(8)).tolist()}  # head_dim 16 -> 8 factors


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    hf = make_hf_model(transformers.Phi3Config, transformers.Phi3ForCausalLM, pad_token_id=0,
                       eos_token_id=2, rope_scaling=_longrope(),
                       original_max_position_embeddings=ORIGINAL_MAX, sliding_window=12)
    return hf, save_hf_checkpoint(hf, tmp_path_factory.mktemp("phi3"))


def test_long_factors_match_transformers(phi3):
    """Served context 256 > 16: long factors; every sequence is longer than 16 from its prefill
    on, where transformers uses the long factors too. The window (12) is shorter than prompts."""
    loaded = load_model(phi3[1], dtype="float32")
    cfg = loaded.config
    assert cfg.sliding_window == 12 and dict(cfg.rope_scaling)["rope_type"] == "longrope"
    inv_freq, attn_factor = rope_frequencies(cfg)
    long = np.asarray(dict(cfg.rope_scaling)["long_factor"])
    np.testing.assert_allclose(inv_freq * long, 10000.0 ** -(np.arange(0, 16, 2) / 16), rtol=1e-6)
    assert attn_factor == pytest.approx(np.sqrt(2.0))  # sqrt(1 + ln(256/16) / ln(16))
    check_against_hf(phi3[0], loaded, prompts=[list(range(3, 23)), list(range(40, 57))],
                     num_tokens=4)


def test_short_factors_match_transformers(phi3):
    """max_model_len=16: short factors (same attention factor); sequences stay within 16."""
    loaded = load_model(phi3[1], dtype="float32", max_model_len=ORIGINAL_MAX)
    check_against_hf(phi3[0], loaded, prompts=[[5, 9, 200, 7, 1], [42]], num_tokens=6)


def test_default_rope_and_config_variants():
    hf = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 256, "max_position_embeddings": 4096, "rope_scaling": None,
          "sliding_window": 2047}
    cfg = config_from_hf(hf)
    assert cfg.rope_scaling is None and cfg.sliding_window == 2047
    su = config_from_hf({**hf, "max_position_embeddings": 131072,
                         "original_max_position_embeddings": 4096,
                         "rope_scaling": {"type": "su", "short_factor": _longrope()["short_factor"],
                                          "long_factor": _longrope()["long_factor"]}})
    assert dict(su.rope_scaling)["type"] == "longrope"
    short = rope_frequencies(longrope_for_context(su, 4096))[0]
    long = rope_frequencies(longrope_for_context(su, 4097))[0]
    np.testing.assert_allclose(short / long, np.divide(*[_longrope()[k] for k in
                                                        ("long_factor", "short_factor")]),
                               rtol=1e-6)
    partial = config_from_hf({**hf, "partial_rotary_factor": 0.75})  # default rope, 4.x spelling
    assert rope_frequencies(partial)[0].shape == (6,)  # head_dim 16 * 0.75 / 2


def test_gguf_matches_transformers(phi3, tmp_path):
    """llama.cpp's phi3 layout: attn_qkv, ffn_up holding gate and up, LongRoPE factors as
    tensors with the context lengths and attention factor in the metadata."""
    pytest.importorskip("gguf")
    from test_qwen_moe import gguf_meta, gguf_tensors, write_gguf

    hf, hf_dir = phi3
    rope = hf.config.rope_parameters
    tensors = {**gguf_tensors(hf),
               "rope_factors_long.weight": np.asarray(rope["long_factor"], np.float32),
               "rope_factors_short.weight": np.asarray(rope["short_factor"], np.float32)}
    meta = {**gguf_meta(hf.config), "rope_scaling_orig_ctx_len": ORIGINAL_MAX,
            "rope_dimension_count": 16, "rope_scaling_attn_factors": float(np.sqrt(2.0)),
            "sliding_window": 12}
    loaded = load_model(write_gguf(tmp_path / "m.gguf", "phi3", meta, tensors), tokenizer=hf_dir)
    assert dict(loaded.config.rope_scaling)["rope_type"] == "longrope"
    check_against_hf(hf, loaded, prompts=[list(range(3, 23)), list(range(40, 57))], num_tokens=4)


def test_partial_rotary_matches_transformers(tmp_path):
    """Phi-4-mini's layout: rope over half of head_dim here (its 3/4 in the real model) with
    LongRoPE factors for those dims only, tied embeddings; and the same from a GGUF."""
    from test_qwen_moe import gguf_meta, gguf_tensors, write_gguf

    rng = np.random.default_rng(1)
    rope = {"rope_type": "longrope", "short_factor": (1 + rng.random(4)).tolist(),
            "long_factor": (2 + 4 * rng.random(4)).tolist(), "partial_rotary_factor": 0.5}
    hf = make_hf_model(transformers.Phi3Config, transformers.Phi3ForCausalLM, seed=2,
                       pad_token_id=0, eos_token_id=2, rope_scaling=rope,
                       partial_rotary_factor=0.5, tie_word_embeddings=True,
                       original_max_position_embeddings=ORIGINAL_MAX)
    hf_dir = save_hf_checkpoint(hf, tmp_path / "hf")
    loaded = load_model(hf_dir, dtype="float32")
    assert rope_frequencies(loaded.config)[0].shape == (4,)  # of head_dim 16: 8 dims rotate
    prompts = [list(range(3, 23)), list(range(40, 57))]
    check_against_hf(hf, loaded, prompts=prompts, num_tokens=4)
    pytest.importorskip("gguf")
    tensors = {**gguf_tensors(hf), "rope_factors_long.weight": np.float32(rope["long_factor"]),
               "rope_factors_short.weight": np.float32(rope["short_factor"])}
    del tensors["output.weight"]  # tied
    meta = {**gguf_meta(hf.config), "rope_scaling_orig_ctx_len": ORIGINAL_MAX,
            "rope_dimension_count": 8}
    from_gguf = load_model(write_gguf(tmp_path / "m.gguf", "phi3", meta, tensors),
                           tokenizer=hf_dir)
    check_against_hf(hf, from_gguf, prompts=prompts, num_tokens=4)
