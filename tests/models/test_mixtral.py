"""Mixtral vs transformers (tiny random checkpoint), routing ties as torch.topk breaks them, the
grouped-matmul MoE block against a dense masked reference, and expert parallelism on fake devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from compare import check_sharded_matches_single
from fixtures import check_against_hf, make_hf_model, save_hf_checkpoint
from flax import nnx

from jaxserve.sharding import make_mesh
from jaxserve.weights import load_model
from models.moe import experts_reference, grouped_experts, route


def _mixtral(seed=0, **kw):
    return make_hf_model(transformers.MixtralConfig, transformers.MixtralForCausalLM, seed=seed,
                         **{"num_local_experts": 4, "num_experts_per_tok": 2, **kw})


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    hf = _mixtral(sliding_window=8)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("mixtral"))
    return hf, path, load_model(path, dtype="float32")


def test_config_and_stacked_experts(mixtral):
    hf, _, loaded = mixtral
    cfg = loaded.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (4, 2, 128)
    assert cfg.norm_topk_prob and cfg.sliding_window == 8
    params = dict(nnx.to_flat_state(loaded.state))
    up = params[("layers", 1, "mlp", "up_proj")].get_value()  # [E, D, F]
    want = hf.model.layers[1].mlp.experts.gate_up_proj.detach()[2, 128:].numpy().T  # expert 2's w3
    np.testing.assert_array_equal(np.asarray(up[2]), want)


def test_matches_transformers(mixtral):
    # The window (8) is shorter than the 20-token prompt.
    check_against_hf(mixtral[0], mixtral[2])


def test_route_breaks_ties_to_the_lower_expert():
    """Exact ties (common with bf16 router logits) go to the lower expert id, at the top and at
    the k-th place, as a stable descending sort (vLLM's topk_softmax kernel does the same).
    torch.topk leaves ties unspecified: on CPU it keeps neither the lower nor the higher id."""
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 3, size=(200, 8)).astype(np.float32)  # many ties
    for k in (1, 2, 3):
        _, ids = route(jnp.asarray(logits), k, normalize=True)
        want = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        np.testing.assert_array_equal(np.asarray(ids), want)


def test_routing_ties_match_transformers(tmp_path):
    """Router rows [a, a, a, b]: every token ties experts 0-2, for both top-2 slots or the second
    only. Experts 0-2 share weights, so transformers' arbitrary tie choice gives the same output;
    a tie mishandled (one expert twice, a weight lost) would not."""
    hf = _mixtral(seed=3)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight[1:3] = layer.mlp.gate.weight[0]
            layer.mlp.experts.gate_up_proj[1:3] = layer.mlp.experts.gate_up_proj[0]
            layer.mlp.experts.down_proj[1:3] = layer.mlp.experts.down_proj[0]
    loaded = load_model(save_hf_checkpoint(hf, tmp_path), dtype="float32")
    check_against_hf(hf, loaded, num_tokens=4)


@pytest.mark.parametrize("num_tokens,top_k", [(1, 2), (13, 3)])
def test_grouped_experts_match_dense_reference(num_tokens, top_k):
    """Token counts not divisible by anything, and expert 4 of 6 that no token picks."""
    E, D, F = 6, 16, 24
    rng = np.random.default_rng(num_tokens)
    x = jnp.asarray(rng.standard_normal((num_tokens, D)), jnp.float32)
    logits = jnp.asarray(rng.standard_normal((num_tokens, E))).at[:, 4].set(-1e9)
    w_gate, w_up = (jnp.asarray(rng.standard_normal((E, D, F)) / 4, jnp.float32) for _ in "gu")
    w_down = jnp.asarray(rng.standard_normal((E, F, D)) / 4, jnp.float32)
    weights, ids = route(logits, top_k, normalize=False)
    assert 4 not in set(np.asarray(ids).ravel())
    got = grouped_experts(x, weights, ids, w_gate, w_up, w_down, jnp.int32(0))
    want = experts_reference(x, weights, ids, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    # Experts 2..3 only (one shard's view): the rest of the assignments contribute nothing.
    part = grouped_experts(x, weights, ids, w_gate[2:4], w_up[2:4], w_down[2:4], jnp.int32(2))
    held = jnp.where((ids >= 2) & (ids < 4), weights, 0.0)
    want = experts_reference(x, held, ids, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(part), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tp", [4])  # one expert per device
def test_expert_parallel_matches_single_device(mixtral, tp):
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    _, path, loaded = mixtral
    sharded = load_model(path, dtype="float32", tensor_parallel_size=tp, mesh=make_mesh(tp))
    up = dict(nnx.to_flat_state(sharded.state))[("layers", 0, "mlp", "up_proj")].get_value()
    assert up.sharding.shard_shape(up.shape)[0] == 4 // tp  # whole experts per device
    check_sharded_matches_single(sharded, loaded)


def preset_param_counts(name: str) -> tuple[int, int]:
    """(total, active per token) parameters of a preset, counted on the abstract model."""
    from jaxserve.sharding import ShardingRules
    from jaxserve.weights import abstract_model
    from models import config_from_hf
    from models.presets import get_preset

    cfg = config_from_hf(get_preset(name))
    _, abstract, _ = abstract_model(cfg, np.dtype("bfloat16"), make_mesh(1), ShardingRules())
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    experts = cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total, total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts


def test_mixtral_preset():
    total, active = preset_param_counts("mistralai/Mixtral-8x7B-v0.1")
    assert round(total / 1e9, 1) == 46.7 and round(active / 1e9, 1) == 12.9  # as published


def test_gguf_matches_transformers(mixtral, tmp_path):
    """llama.cpp writes Mixtral as its "llama" arch with experts: stacked expert tensors and the
    q/k rows permuted for its rope layout."""
    pytest.importorskip("gguf")
    from test_gguf import _permute
    from test_qwen_moe import gguf_meta, gguf_tensors, write_gguf

    hf, hf_dir, _ = mixtral
    tensors = gguf_tensors(hf)
    for name in list(tensors):
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = hf.config.num_attention_heads if "attn_q" in name else 2
            tensors[name] = _permute(tensors[name], heads)
    meta = {**gguf_meta(hf.config), "expert_count": 4, "expert_used_count": 2,
            "sliding_window": 8}
    loaded = load_model(write_gguf(tmp_path / "m.gguf", "llama", meta, tensors), tokenizer=hf_dir)
    assert loaded.config.architecture == "MixtralForCausalLM" and loaded.config.norm_topk_prob
    check_against_hf(hf, loaded, num_tokens=4)
