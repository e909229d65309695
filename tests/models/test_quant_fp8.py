"""fp8 W8A8 (quantization="fp8"): a tiny Llama quantized at load, and FP8 checkpoints written here
as llm-compressor (compressed-tensors, per-channel bf16 scales) and vLLM's fp8 format (per-tensor
f32 scales) write them.

Oracle: transformers' model with each projection's weight replaced by its dequantized fp8 weight
and each projection's input fake-quantized per token (torch's own float8_e4m3fn cast), i.e. the
same math in f32 with no FP8 matmul: logits agree to f32 rounding. Against the unquantized model
the error is e4m3's (3 mantissa bits: up to 2^-4 relative per weight and activation element).
"""
import copy
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from fixtures import PROMPTS, Driver, hf_logits, make_hf_model, save_hf_checkpoint
from flax import nnx
from safetensors.numpy import save_file

from jaxserve.weights import load_model
from models.linear import QuantLinear, fp8_matmul, fp8_matmul_reference

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3 = ml_dtypes.float8_e4m3fn


def _fp8_channel(w: np.ndarray, scale_dtype=np.float32):
    """Per-output-channel e4m3 (written from the spec: scale = amax / 448, round to nearest)."""
    scale = (np.abs(w).max(axis=1, keepdims=True) / 448.0).astype(scale_dtype)
    q = np.clip(w / scale.astype(np.float32), -448, 448).astype(E4M3)
    return q, scale


def _fp8_tensor(w: np.ndarray):
    scale = np.float32(np.abs(w).max() / 448.0)
    return np.clip(w / scale, -448, 448).astype(E4M3), np.array(scale, np.float32)


def _fake_quant_hf(hf_model, dequantized: dict[str, np.ndarray]):
    """A copy of hf_model whose projections use the given weights and fake-quantize their input
    per token to e4m3 (the W8A8 oracle)."""
    model = copy.deepcopy(hf_model)

    def fake_quant(_module, args):
        x = args[0].float()
        s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 448.0
        return ((x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s,)

    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in PROJ:
                module.weight.copy_(torch.from_numpy(dequantized[name + ".weight"]))
                module.register_forward_pre_hook(fake_quant)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = make_hf_model(transformers.LlamaConfig, transformers.LlamaForCausalLM, seed=3)
    return hf, save_hf_checkpoint(hf, tmp_path_factory.mktemp("llama_fp8"))


@pytest.fixture(scope="module")
def at_load(llama):
    return load_model(llama[1], dtype="float32", quantization="fp8")


def _params(loaded) -> dict:
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(loaded.state)}


def _hf_weights(hf_model) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in hf_model.state_dict().items()}


def _compare(loaded, reference, prompts=PROMPTS, num_tokens=4):
    """Prefill and decode logits vs the oracle. f32 rounding differences between the two can flip
    one activation's e4m3 rounding (one e4m3 step, 6%), which moves that token's logits by
    ~2e-4: so all logits within 2e-3 and 90% of token rows within 1e-5 (f32 rounding only)."""
    _, decode, tokens = Driver(loaded, len(prompts)).greedy(prompts, num_tokens)
    prefill = Driver(loaded, len(prompts)).step([p + t for p, t in zip(prompts, tokens)])
    for b, ids in enumerate(prompts):
        ref = hf_logits(reference, ids + tokens[b])
        for got, want in [(prefill[b], ref), (decode[0][b], ref[len(ids)])]:
            err = np.abs(got - want).reshape(-1, want.shape[-1]).max(axis=-1)  # per token
            assert err.max() < 2e-3, err
        assert np.mean(np.abs(prefill[b] - ref).max(axis=-1) > 1e-5) <= 0.1
    return tokens


def test_quantized_at_load_layout(llama, at_load):
    """Every projection is an e4m3 [O, I] QuantLinear equal to a numpy quantization of the HF
    weight (same [out, in] order for q/k/v/o and the MLP); embed, norms and lm_head stay f32."""
    assert at_load.config.quantization == "fp8"
    params, hf = _params(at_load), _hf_weights(llama[0])
    for i in range(2):
        for proj, hf_name in [("attn.q_proj", "self_attn.q_proj"),
                              ("attn.o_proj", "self_attn.o_proj"),
                              ("attn.k_proj", "self_attn.k_proj"),
                              ("mlp.down_proj", "mlp.down_proj")]:
            q, s = _fp8_channel(hf[f"model.layers.{i}.{hf_name}.weight"])
            got_q = params[f"layers.{i}.{proj}.qweight"]
            assert got_q.dtype == jnp.float8_e4m3fn
            np.testing.assert_array_equal(np.asarray(got_q).view(np.uint8), q.view(np.uint8))
            np.testing.assert_array_equal(np.asarray(params[f"layers.{i}.{proj}.qscale"]), s[:, 0])
    assert params["lm_head"].dtype == jnp.float32 and params["embed"].dtype == jnp.float32
    model = nnx.merge(at_load.graphdef, at_load.state)
    assert isinstance(model.layers[0].attn.q_proj, QuantLinear)


def test_fp8_matmul_matches_dequantized_reference():
    """The e4m3 dot_general path equals (q(x) s_x) @ (w s_w)^T in f32 on awkward shapes."""
    rng = np.random.default_rng(0)
    for M, I, O in [(1, 64, 48), (7, 200, 33), (33, 128, 256)]:
        x = jnp.asarray(rng.standard_normal((M, I)) * 3, jnp.float32)
        q, s = _fp8_channel(rng.standard_normal((O, I)).astype(np.float32))
        w, ws = jnp.asarray(q), jnp.asarray(s[:, 0])
        got, want = np.asarray(fp8_matmul(x, w, ws)), np.asarray(fp8_matmul_reference(x, w, ws))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    x = jnp.zeros((2, 64), jnp.bfloat16)  # all-zero rows: zeros, not NaN
    out = fp8_matmul(x, jnp.asarray(_fp8_channel(np.ones((8, 64), np.float32))[0]),
                     jnp.ones((8,), jnp.float32))
    assert out.dtype == jnp.bfloat16 and not np.asarray(out, np.float32).any()


def test_quantized_at_load_matches_fake_quant_oracle(llama, at_load):
    hf = _hf_weights(llama[0])
    deq = {}
    for name, w in hf.items():
        if name.split(".")[-2] in PROJ:
            q, s = _fp8_channel(w)
            deq[name] = q.astype(np.float32) * s
    _compare(at_load, _fake_quant_hf(llama[0], deq))


def test_quantized_at_load_close_to_unquantized(llama, at_load):
    """Tolerance: e4m3 rounds each weight and activation element by up to 2^-4 (RMS ~2.5%
    relative); a random tiny model's dot products cancel (results much smaller than the operand
    norms), so relative errors grow through 7 matmuls per layer and two layers: 8.3% relative
    RMS on the logits here (the oracle test above shows it is all rounding). Bound: 15%, and
    above 0.1% (the model is quantized at all)."""
    ref = hf_logits(llama[0], PROMPTS[0])
    got = Driver(at_load, 1).step([PROMPTS[0]])[0]
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-3 < err < 0.15, err


def _write_fp8_checkpoint(hf_model, path, fmt: str) -> dict[str, np.ndarray]:
    """Save hf_model as an FP8 checkpoint the way llm-compressor ("compressed-tensors":
    F8_E4M3 weight + bf16 weight_scale [O, 1], lm_head ignored) or AutoFP8/vLLM ("fp8": f32
    per-tensor weight_scale [] and input_scale) writes it. Returns the dequantized weights."""
    save_hf_checkpoint(hf_model, path)
    os.remove(os.path.join(path, "model.safetensors"))
    tensors, deq = {}, {}
    for name, w in _hf_weights(hf_model).items():
        if name.split(".")[-2] not in PROJ:
            tensors[name] = w.astype(ml_dtypes.bfloat16) if fmt == "fp8" else w
            continue
        prefix = name.removesuffix(".weight")
        if fmt == "compressed-tensors":
            q, s = _fp8_channel(w, ml_dtypes.bfloat16)
        else:
            q, s = _fp8_tensor(w)
            tensors[prefix + ".input_scale"] = np.array(0.02, np.float32)
        tensors[name], tensors[prefix + ".weight_scale"] = q, s
        deq[name] = q.astype(np.float32) * s.astype(np.float32)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                        "symmetric": True, "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                  "dynamic": True}}}} if fmt == "compressed-tensors" else {
        "quant_method": "fp8", "activation_scheme": "static"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return deq


@pytest.mark.parametrize("fmt", ["compressed-tensors", "fp8"])
def test_fp8_checkpoint_loads_and_matches(llama, tmp_path, fmt):
    deq = _write_fp8_checkpoint(llama[0], str(tmp_path), fmt)
    loaded = load_model(str(tmp_path), dtype="float32")  # method from quantization_config
    assert loaded.config.quantization == "fp8"
    params = _params(loaded)
    w = np.asarray(params["layers.1.attn.k_proj.qweight"], np.float32)
    scale = np.asarray(params["layers.1.attn.k_proj.qscale"])[:, None]
    np.testing.assert_array_equal(w * scale, deq["model.layers.1.self_attn.k_proj.weight"])
    hf = _hf_weights(llama[0])
    reference = copy.deepcopy(llama[0])
    if fmt == "fp8":  # the non-projection weights were written in bf16
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if name not in deq:
                    bf16 = hf[name].astype(ml_dtypes.bfloat16).astype(np.float32)
                    p.copy_(torch.from_numpy(bf16))
    _compare(loaded, _fake_quant_hf(reference, deq), num_tokens=2)
    again = load_model(str(tmp_path), dtype="float32", quantization="fp8")
    assert again.config.quantization == "fp8"
    with pytest.raises(ValueError, match="quantization='awq' does not match"):
        load_model(str(tmp_path), quantization="awq")


def test_bfloat16_model_quantized_at_load(llama, tmp_path):
    """bf16 activations in, bf16 out; greedy tokens of the prompts as the f32 fp8 model's."""
    bf16 = copy.deepcopy(llama[0]).to(torch.bfloat16)
    loaded = load_model(save_hf_checkpoint(bf16, tmp_path), quantization="fp8")
    assert loaded.dtype == jnp.bfloat16
    out = Driver(loaded, 1).step([PROMPTS[0]])[0]
    ref = hf_logits(bf16, PROMPTS[0])
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


def test_unsupported_fp8_variants_are_refused(llama, tmp_path):
    from models.quant import method_from_hf

    with pytest.raises(ValueError, match="weight_block_size"):
        method_from_hf({"quantization_config": {"quant_method": "fp8",
                                                "weight_block_size": [128, 128]}}, None)
    with pytest.raises(ValueError, match="compressed-tensors format='pack-quantized'"):
        method_from_hf({"quantization_config": {"quant_method": "compressed-tensors",
                                                "format": "pack-quantized"}}, None)
    with pytest.raises(ValueError, match="quantization='int8' is not supported"):
        method_from_hf({}, "int8")
    with pytest.raises(ValueError, match="quantization='awq' needs a awq checkpoint"):
        load_model(llama[1], quantization="awq")


def test_fp8_needs_fp8_tensor_cores():
    from types import SimpleNamespace

    from models.quant import check_fp8_devices

    def gpu(cc):
        return SimpleNamespace(platform="gpu", compute_capability=cc, device_kind="NVIDIA X")

    check_fp8_devices([gpu("9.0"), gpu("8.9"), SimpleNamespace(platform="cpu")])
    with pytest.raises(ValueError, match=r"compute capability >= 8.9\); NVIDIA X has 8.0"):
        check_fp8_devices([gpu("8.0")])


def test_tensor_parallel_matches_single_device(llama, at_load):
    """fp8 projections sharded 2 ways (q/k/v/gate/up on their output, o/down on their input,
    whose per-token activation amax then spans both shards) give the single-device logits."""
    import jax

    from jaxserve.sharding import make_mesh

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    sharded = load_model(llama[1], dtype="float32", quantization="fp8", tensor_parallel_size=2,
                         mesh=make_mesh(2))
    q = _params(sharded)["layers.0.attn.q_proj.qweight"]
    assert len(q.sharding.device_set) == 2
    with jax.set_mesh(sharded.mesh):
        got = Driver(sharded, 2).greedy(PROMPTS[:2], 3)
    want = Driver(at_load, 2).greedy(PROMPTS[:2], 3)
    for b in range(2):
        np.testing.assert_allclose(got[0][b], want[0][b], atol=1e-4, rtol=0)
    assert got[2] == want[2]
