"""Qwen2-MoE and Qwen3-MoE vs transformers on tiny random checkpoints: a shared expert with its
sigmoid gate, top-k without renormalization (norm_topk_prob=False), a dense layer kept by
mlp_only_layers, decoder_sparse_step, and Qwen3's q/k norms with renormalized top-k."""
import pytest
import transformers
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint

from jaxserve.weights import load_model
from models import config_from_hf

MOE = dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32)


def test_qwen2_moe_matches_transformers(tmp_path):
    # mlp_only_layers=[1]: layer 0 has experts, layer 1 a dense MLP of intermediate_size.
    hf = make_hf_model(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, **MOE,
                       shared_expert_intermediate_size=48, norm_topk_prob=False,
                       mlp_only_layers=[1])
    loaded = load_model(save_hf_checkpoint(hf, tmp_path), dtype="float32")
    cfg = loaded.config
    assert cfg.qkv_bias and not cfg.norm_topk_prob and cfg.shared_expert_intermediate_size == 48
    assert [cfg.is_sparse(i) for i in range(2)] == [True, False]
    check_against_hf(hf, loaded, num_tokens=4)


def test_qwen3_moe_matches_transformers(tmp_path):
    hf = make_hf_model(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, **MOE,
                       head_dim=32, norm_topk_prob=True, decoder_sparse_step=2)
    loaded = load_model(save_hf_checkpoint(hf, tmp_path), dtype="float32")
    cfg = loaded.config
    assert cfg.qk_norm and cfg.norm_topk_prob and cfg.head_dim == 32
    assert [cfg.is_sparse(i) for i in range(2)] == [False, True]  # (i + 1) % 2 == 0
    check_against_hf(hf, loaded, num_tokens=4)


@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"])
def test_refused_variants(arch):
    hf = {"architectures": [arch], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256,
          "shared_expert_intermediate_size": 0, **MOE}
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf({**hf, "use_sliding_window": True})
    with pytest.raises(ValueError, match="num_experts"):
        config_from_hf({**hf, "num_experts": 0})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        config_from_hf({**hf, "num_experts_per_tok": 7})


def test_qwen3_30b_a3b_preset():
    from test_mixtral import preset_param_counts

    total, active = preset_param_counts("Qwen/Qwen3-30B-A3B")
    assert round(total / 1e9, 1) == 30.5 and 3.3e9 < active < 3.4e9  # published: 30.5B, 3.3B
