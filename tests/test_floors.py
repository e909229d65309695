"""benchmarks/common.py's floors count the right parameters: every expert of a MoE for its size,
the top-k experts for its FLOPs, and for the bytes of a step only the experts its tokens reach
(issue 18: MoE decode is measured against active-expert bytes). Checked against the parameters of
the abstract models themselves and the published sizes."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks import common
from jaxserve.sharding import ShardingRules, make_mesh
from jaxserve.weights import abstract_model
from models import config_from_hf
from models.presets import get_preset


def _config_and_count(name: str):
    cfg = config_from_hf(get_preset(name))
    _, abstract, _ = abstract_model(cfg, np.dtype("bfloat16"), make_mesh(1), ShardingRules())
    return cfg, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))


@pytest.mark.parametrize("name, total_b, active_b", [
    ("llama-3-8b", 8.03, 8.03), ("qwen2-7b", 7.62, 7.62), ("mixtral-8x7b", 46.7, 12.9),
    ("qwen3-30b-a3b", 30.5, 3.3)])
def test_parameter_counts_match_the_models(name, total_b, active_b):
    cfg, counted = _config_and_count(name)
    assert common.param_count(cfg) == counted  # every leaf of the model, nothing else
    # as published (Qwen3-30B-A3B's "3.3B activated" is 3.35B with its embeddings)
    assert common.param_count(cfg) / 1e9 == pytest.approx(total_b, abs=0.06)
    assert common.active_params(cfg) / 1e9 == pytest.approx(active_b, abs=0.06)


def test_step_bytes_follow_the_experts_reached():
    cfg, _ = _config_and_count("mixtral-8x7b")
    always, expert, sparse = common.param_split(cfg)
    assert sparse == cfg.num_layers and expert == sparse * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    one = common.weight_bytes_read(cfg, 2, 1)
    assert one == 2 * (always + cfg.num_experts_per_tok * expert)  # one token: its top-2
    assert one < common.weight_bytes_read(cfg, 2, 4) < common.weight_bytes_read(cfg, 2, 256)
    assert common.weight_bytes_read(cfg, 2, 256) == pytest.approx(2 * common.param_count(cfg))
    dense, _ = _config_and_count("llama-3-8b")
    assert (common.weight_bytes_read(dense, 2, 1) == common.weight_bytes_read(dense, 2, 512)
            == 2 * common.param_count(dense))
