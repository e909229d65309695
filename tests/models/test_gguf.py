"""GGUF loading on a tiny Llama written by gguf.GGUFWriter the way llama.cpp's converter does
(q/k rows permuted for its rope layout): F32 must match transformers exactly, quantized closely."""
import numpy as np
import pytest
import transformers
from fixtures import Driver, check_against_hf, hf_logits, make_hf_model, save_hf_checkpoint
from flax import nnx

from jaxserve.weights import load_model

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(name: str) -> str:
    if name in NAMES:
        return NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{suffix}"


def _permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf: HF rotate-half rows -> interleaved pairs, per head."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(hf_model, path, qtype) -> str:
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(2)
    for name, tensor in hf_model.state_dict().items():
        w = tensor.float().numpy()
        if "q_proj" in name:
            w = _permute(w, cfg.num_attention_heads)
        elif "k_proj" in name:
            w = _permute(w, cfg.num_key_value_heads)
        t = qtype if w.ndim == 2 else Q.F32
        writer.add_tensor(_gguf_name(name), gguf.quants.quantize(w, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = make_hf_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed=5)
    return hf, save_hf_checkpoint(hf, tmp_path_factory.mktemp("llama_hf"))


def test_f32_gguf_matches_transformers(llama, tmp_path):
    hf, hf_dir = llama
    path = write_gguf(hf, tmp_path / "tiny-f32.gguf", Q.F32)
    loaded = load_model(path, tokenizer=hf_dir)
    assert loaded.dtype == np.dtype("float32") and loaded.eos_token_ids == {2}
    assert not loaded.config.tie_word_embeddings
    check_against_hf(hf, loaded, num_tokens=4)


# Minimum cosine similarity of prefill logits with the unquantized model (tiny random models are
# sensitive: 4-bit weights move attention a lot).
MIN_COSINE = {Q.F16: 0.99999, Q.BF16: 0.9999, Q.Q8_0: 0.999, Q.Q4_0: 0.9, Q.Q4_1: 0.9}


@pytest.mark.parametrize("qtype", list(MIN_COSINE), ids=lambda q: q.name)
def test_quantized_gguf_dequantizes(llama, tmp_path, qtype):
    hf, hf_dir = llama
    path = write_gguf(hf, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    loaded = load_model(path, tokenizer=hf_dir)
    w = hf.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy()  # [K*H, D]
    want = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    got = dict(nnx.to_flat_state(loaded.state))[("layers", 1, "attn", "k_proj")].get_value()
    np.testing.assert_array_equal(np.asarray(got), want.reshape(2, 16, 64).transpose(2, 0, 1))
    ids = list(range(3, 23))
    ours, ref = Driver(loaded, 1).step([ids])[0], hf_logits(hf, ids)
    cosine = (ours * ref).sum() / np.linalg.norm(ours) / np.linalg.norm(ref)
    assert cosine > MIN_COSINE[qtype]
