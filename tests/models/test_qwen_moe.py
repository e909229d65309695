"""Qwen2-MoE and Qwen3-MoE vs transformers on tiny random checkpoints: a shared expert with its
sigmoid gate, top-k without renormalization (norm_topk_prob=False), a dense layer kept by
mlp_only_layers, decoder_sparse_step, and Qwen3's q/k norms with renormalized top-k."""
import numpy as np
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


_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
               "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
               **{f"mlp.shared_expert.{p}_proj": f"ffn_{p}_shexp" for p in ("gate", "up", "down")}}


def gguf_tensors(hf_model) -> dict:
    """The model's float32 tensors under llama.cpp's names; experts stacked [E, out, in]."""
    out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    out = {k: hf_model.state_dict()[v].float().numpy() for k, v in out.items()}
    for name, tensor in hf_model.state_dict().items():
        w = tensor.float().numpy()
        if not name.startswith("model.layers."):
            continue
        _, _, layer, rest = name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        if module == "mlp.experts":  # transformers 5 holds them fused: gate_up [E, 2F, D]
            if suffix == "gate_up_proj":
                out[f"blk.{layer}.ffn_gate_exps.weight"], out[f"blk.{layer}.ffn_up_exps.weight"] = (
                    np.split(w, 2, axis=1))
            else:
                out[f"blk.{layer}.ffn_down_exps.weight"] = w
        else:
            out[f"blk.{layer}.{_GGUF_LAYER[module]}.{suffix}"] = w
    return out


def write_gguf(path, arch: str, meta: dict, tensors: dict) -> str:
    """A float32 GGUF; meta maps GGUFWriter.add_<key> to its value."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        getattr(writer, "add_" + key)(value)
    for name, w in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def gguf_meta(cfg) -> dict:
    return dict(block_count=cfg.num_hidden_layers, context_length=cfg.max_position_embeddings,
                embedding_length=cfg.hidden_size, feed_forward_length=cfg.intermediate_size,
                head_count=cfg.num_attention_heads, head_count_kv=cfg.num_key_value_heads,
                layer_norm_rms_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size,
                rope_freq_base=cfg.rope_parameters["rope_theta"], eos_token_id=2)


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen3moe"])
def test_gguf_matches_transformers(arch, tmp_path):
    """llama.cpp's layout: experts stacked per layer, Qwen2-MoE's shared expert and its gate."""
    pytest.importorskip("gguf")
    if arch == "qwen2moe":
        hf = make_hf_model(transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, seed=1,
                           **MOE, shared_expert_intermediate_size=48)
        extra = dict(expert_shared_feed_forward_length=48)
    else:
        hf = make_hf_model(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, seed=1,
                           **MOE, head_dim=32, norm_topk_prob=True)
        extra = dict(key_length=32, value_length=32)
    hf_dir = save_hf_checkpoint(hf, tmp_path / "hf")
    meta = {**gguf_meta(hf.config), **extra, "expert_count": 6, "expert_used_count": 3,
            "expert_feed_forward_length": 32}
    loaded = load_model(write_gguf(tmp_path / "m.gguf", arch, meta, gguf_tensors(hf)),
                        tokenizer=hf_dir)
    assert loaded.config.architecture == hf.config.architectures[0]
    assert loaded.config.norm_topk_prob == (arch == "qwen3moe")  # llama.cpp's choice per arch
    check_against_hf(hf, loaded, num_tokens=4)


def test_experts_must_divide_over_tensor_parallel_shards():
    import jax

    from jaxserve.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    small = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 256, "num_experts": 10}
    with pytest.raises(ValueError, match="num_experts=10 must be divisible by the 4 expert"):
        load_model("qwen3-30b-a3b", load_format="dummy", hf_overrides=small,
                   tensor_parallel_size=4, mesh=make_mesh(4))
