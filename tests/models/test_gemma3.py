"""Gemma 3 (text) vs transformers: Gemma 2's blocks plus (1 + w) q/k norms, a sliding layer
(window 8 < the 20-token prompt) with its own rope base (100, default rope) before a global layer
with linear rope scaling; no soft caps. Also the 4.x config spelling and the multimodal refusal."""
import pytest
import transformers
from compare import check_sharded_matches_single
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint

from jaxserve.weights import load_model
from models import config_from_hf

ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
GEMMA3 = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, rope_parameters=ROPE,
              layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    hf = make_hf_model(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, **GEMMA3)
    return hf, load_model(save_hf_checkpoint(hf, tmp_path_factory.mktemp("gemma3")),
                          dtype="float32")


def test_config(gemma3):
    cfg = gemma3[1].config
    assert cfg.qk_norm and cfg.final_logit_soft_cap is None and cfg.attn_logits_soft_cap is None
    assert (cfg.rope_theta, cfg.rope_scaling_dict, cfg.rope_local_theta) == (
        10000.0, {"rope_type": "linear", "factor": 2.0}, 100.0)
    local, full = cfg.layer_config(0), cfg.layer_config(1)
    assert (local.sliding_window, local.rope_theta, local.rope_scaling) == (8, 100.0, None)
    assert (full.sliding_window, full.rope_theta) == (None, 10000.0)


def test_matches_transformers(gemma3):
    check_against_hf(*gemma3, num_tokens=8)


BASE = {"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 12,
        "num_attention_heads": 1, "head_dim": 8}


def test_transformers_4_config_spelling():
    """config.json as transformers 4.x wrote it (gemma-3-1b-it): rope_local_base_freq,
    sliding_window_pattern, rope_scaling for the global layers only."""
    cfg = config_from_hf({**BASE, "architectures": ["Gemma3ForCausalLM"], "rope_theta": 1e6,
                          "rope_local_base_freq": 1e4, "sliding_window_pattern": 6,
                          "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                          "sliding_window": 512})
    assert cfg.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 2
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling_dict) == (
        1e6, 1e4, {"rope_type": "linear", "factor": 8.0})
    assert cfg.layer_config(0).rope_scaling is None and cfg.layer_config(5).rope_theta == 1e6


def test_multimodal_gemma3_is_refused_naming_the_vision_tower():
    hf = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": BASE,
          "vision_config": {"model_type": "siglip_vision_model"}}
    with pytest.raises(ValueError, match="vision tower"):
        config_from_hf(hf)


def test_tensor_parallel_matches_single_device(gemma3):
    """4 model shards over 2 kv heads (each replicated twice): the per-layer configs keep the
    replication, and the sharded q/k norms and windows give the single-device logits."""
    import jax

    from jaxserve.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    loaded = gemma3[1]
    sharded = load_model(loaded.model_name, dtype="float32", tensor_parallel_size=4,
                         mesh=make_mesh(4))
    assert sharded.config.layer_config(0).kv_replication == 2
    check_sharded_matches_single(sharded, loaded)
