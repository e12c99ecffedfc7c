"""ModelConfig on the published configs of DeepSeek-R1 and V2-Lite, and the shapes they imply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xpuserve.config import ConfigError, ModelConfig
from xpuserve.engine.kv_cache import bytes_per_token
from xpuserve.models import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "shared/models/configs"
pytestmark = pytest.mark.skipif(not CONFIGS.exists(), reason=f"{CONFIGS} is not on this machine")


def test_r1_config_keeps_what_changes_the_math():
    cfg = ModelConfig.from_pretrained_file(CONFIGS / "deepseek-r1.json")
    assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim) == (1536, 512, 64, 128)
    assert (cfg.topk_method, cfg.scoring_func, cfg.n_group, cfg.topk_group) == ("noaux_tc", "sigmoid", 8, 4)
    assert cfg.norm_topk_prob and cfg.routed_scaling_factor == 2.5 and cfg.first_k_dense_replace == 3
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 40 and cfg.rope.original_max_position_embeddings == 4096
    assert cfg.quantization.weight_block_size == (128, 128)
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]


def test_v2_lite_has_no_q_lora_and_softmax_greedy_routing():
    cfg = ModelConfig.from_pretrained_file(CONFIGS / "deepseek-v2-lite.json")
    assert cfg.q_lora_rank is None and cfg.topk_method == "greedy" and cfg.scoring_func == "softmax"
    assert cfg.rope.mscale_all_dim == 0.707 and cfg.quantization is None


@pytest.mark.parametrize(
    "name, total_params, active_params",
    [("deepseek-r1.json", 671e9, 37e9), ("deepseek-v2-lite.json", 15.7e9, 2.4e9)],
)
def test_real_shapes_on_meta_device(name, total_params, active_params):
    """Building the model on the meta device gives the published parameter counts and the latent cache size."""
    cfg = ModelConfig.from_pretrained_file(CONFIGS / name)
    model = build_model(cfg, torch.bfloat16, "meta")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - total_params) / total_params < 0.01, total
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    idle = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    active = total - idle - model.model.embed_tokens.weight.numel()  # the embedding is a lookup, not compute
    assert abs(active - active_params) / active_params < 0.03, active
    # MLA caches the normed latent and the rotary key only: (512 + 64) values per token and layer.
    assert bytes_per_token(model, torch.bfloat16) == (512 + 64) * cfg.num_hidden_layers * 2


def test_transformers_style_rope_parameters(tmp_path):
    raw = json.loads((CONFIGS / "deepseek-r1.json").read_text())
    scaling = raw.pop("rope_scaling")
    raw["rope_parameters"] = {**scaling, "rope_type": scaling["type"], "rope_theta": raw.pop("rope_theta")}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 40 and cfg.rope.theta == 10000


def test_unsupported_rope_and_quantization_are_named():
    raw = json.loads((CONFIGS / "deepseek-r1.json").read_text())
    with pytest.raises(ConfigError, match="rope type 'dynamic' is not supported"):
        ModelConfig.from_dict({**raw, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="quantization 'awq' is not supported"):
        ModelConfig.from_dict({**raw, "quantization_config": {"quant_method": "awq"}})
