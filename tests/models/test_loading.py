"""Loader errors a switching user meets: max_model_len above the model's limit, unimplemented rope
types, quantized checkpoints, missing weights, presets outside load_format="dummy"; and the
safetensors reader (the safetensors library, numpy framework, bf16 without torch)."""
import json
import os
import subprocess
import sys

import huggingface_hub.constants
import ml_dtypes
import numpy as np
import pytest
from fixtures import save_numpy_llama
from safetensors.numpy import save_file

from jaxserve.checkpoint import open_checkpoint, read_safetensors
from jaxserve.gguf_checkpoint import gguf_to_hf_config
from jaxserve.weights import load_model
from models import config_from_hf

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_numpy_llama(tmp_path_factory.mktemp("tiny"))  # max_position_embeddings=256


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _edit_config(src: str, dst, **changes) -> str:
    """A copy of checkpoint `src` at `dst` with config.json fields changed (weights linked)."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name != "config.json":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        hf = {**json.load(f), **changes}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf, f)
    return str(dst)


def test_max_model_len_above_the_model_limit_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"max_model_len=257.*max_position_embeddings=256"):
        load_model(tiny, max_model_len=257)
    with pytest.raises(ValueError, match=r"max_model_len=1048576.*max_position_embeddings=32768"):
        load_model("mistral-7b", load_format="dummy", hf_overrides=SMALL, max_model_len=1 << 20)
    assert load_model(tiny, max_model_len=256).max_model_len == 256
    assert load_model(tiny).max_model_len == 256
    raised = load_model(tiny, max_model_len=300, hf_overrides={"max_position_embeddings": 300})
    assert raised.max_model_len == 300


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"type": "dynamic", "factor": 4.0},  # the 4.x key
                                  {"rope_type": "mrope", "mrope_section": [2, 2, 4]}])
def test_unimplemented_rope_type_fails_at_load(tiny, tmp_path, rope):
    name = rope.get("rope_type", rope.get("type"))
    with pytest.raises(ValueError, match=f"rope_type='{name}' is not supported"):
        load_model(_edit_config(tiny, tmp_path / "m", rope_scaling=rope))
    with pytest.raises(ValueError, match=f"rope_type='{name}'"):  # HF 5.x spelling
        config_from_hf({**json.load(open(os.path.join(tiny, "config.json"))),
                        "rope_parameters": {"rope_theta": 1e4, **rope}})


def test_rope_scaling_missing_keys_fails_at_load(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"rope_type='llama3' lacks \['low_freq_factor'"):
        load_model(_edit_config(tiny, tmp_path / "m",
                                rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_gguf_rope_scaling_type_is_checked():
    meta = {"general.architecture": "llama", "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.block_count": 2,
            "llama.attention.head_count": 4, "llama.vocab_size": 256}
    hf = gguf_to_hf_config({**meta, "llama.rope.scaling.type": "yarn",
                            "llama.rope.scaling.factor": 4.0,
                            "llama.rope.scaling.original_context_length": 4096}, set())
    assert dict(config_from_hf(hf).rope_scaling) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert config_from_hf(gguf_to_hf_config({**meta, "llama.rope.scaling.type": "none"},
                                            set())).rope_scaling is None
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        config_from_hf(gguf_to_hf_config({**meta, "llama.rope.scaling.type": "longrope",
                                          "llama.rope.scaling.factor": 2.0}, set()))


@pytest.mark.parametrize("method", ["bitsandbytes", "hqq"])  # fp8/awq/gptq: test_quant_*.py
def test_quantization_config_is_refused(tiny, tmp_path, method):
    path = _edit_config(tiny, tmp_path / "q", quantization_config={"quant_method": method,
                                                                   "bits": 4})
    with pytest.raises(ValueError, match=f"quantization method '{method}' is not supported"):
        load_model(path)


def test_fp8_e5m2_safetensors_dtype_is_refused(tmp_path):  # F8_E4M3 is read (test_quant_fp8)
    save_file({"w": np.ones((4, 4), ml_dtypes.float8_e5m2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"stores 'w' as F8_E5M2"):
        read_safetensors(str(tmp_path / "a.safetensors"))


def test_quantized_tensor_names_are_refused(tiny, tmp_path):
    """A GPTQ checkpoint whose config lost quantization_config: named, not "lacks tensors"."""
    path = tmp_path / "gptq"
    os.makedirs(path)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        os.symlink(os.path.join(tiny, name), path / name)
    save_file({"model.layers.0.self_attn.q_proj.qweight": np.zeros((8, 64), np.int32)},
              str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"qweight.*gptq/awq.*no quantization_config"):
        load_model(str(path))


def test_no_weights_names_the_path_and_what_was_looked_for(tiny, tmp_path):
    path = tmp_path / "empty"
    os.makedirs(path)
    for name in set(os.listdir(tiny)) - {"model.safetensors"}:
        os.symlink(os.path.join(tiny, name), path / name)
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"no weights in '{path}': looked for "
                                         r"model.safetensors.index.json.*pytorch_model.bin"):
        load_model(str(path))
    save_file({}, str(path / "model.safetensors"))  # a file with no tensors: never random weights
    with pytest.raises(ValueError, match="holds no tensors"):
        load_model(str(path))
    assert open_checkpoint(str(path), "dummy").tensors == {}  # dummy needs no weights


def test_index_naming_a_missing_shard(tiny, tmp_path):
    path = _edit_config(tiny, tmp_path / "idx")
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_model(path)


def test_presets_only_with_dummy():
    """Before: load_format="auto" on a preset name silently built random weights."""
    with pytest.raises(ValueError, match=r"'qwen2-7b'.*load_format='dummy'"):
        load_model("qwen2-7b", hf_overrides=SMALL)
    ckpt = open_checkpoint("Qwen/Qwen2-7B", "dummy")  # test_registry builds it
    assert ckpt.tensors == {} and ckpt.hf_config["architectures"] == ["Qwen2ForCausalLM"]


def test_safetensors_reader_bf16_lazy(tmp_path):
    w = (np.arange(12, dtype=np.float32).reshape(3, 4) / 8).astype(ml_dtypes.bfloat16)
    save_file({"w": w, "b": np.arange(3, dtype=np.int64)}, str(tmp_path / "m.safetensors"))
    tensors = read_safetensors(str(tmp_path / "m.safetensors"))
    assert sorted(tensors) == ["b", "w"] and all(callable(t) for t in tensors.values())
    got = tensors["w"]()
    assert got.dtype == ml_dtypes.bfloat16 and got.shape == (3, 4)
    np.testing.assert_array_equal(got.astype(np.float32), w.astype(np.float32))
    np.testing.assert_array_equal(tensors["b"](), np.arange(3))
    # A fresh process with torch blocked and nothing importing jax or ml_dtypes first.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from jaxserve.checkpoint import read_safetensors\n"
            f"w = read_safetensors({str(tmp_path / 'm.safetensors')!r})['w']()\n"
            "print(w.dtype, float(w[2, 3]))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.stdout.split() == ["bfloat16", "1.375"], out.stderr[-2000:]


def test_bf16_checkpoint_loads_in_bf16(tmp_path):
    path = save_numpy_llama(tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    loaded = load_model(path)
    assert loaded.dtype == np.dtype(ml_dtypes.bfloat16)
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    from flax import nnx

    got = np.asarray(dict(nnx.to_flat_state(loaded.state))[("embed",)].get_value())
    np.testing.assert_array_equal(got.astype(np.float32), embed.astype(np.float32))
