"""The demo model's architecture (a tiny DeepSeek-V3), its initialisation and router balancing.

The shape keeps every R1 feature that changes the math: MLA with a q LoRA, a dense first
layer, then DeepSeekMoE with one shared expert and 8 routed experts in 2 groups of 4, sigmoid
scores, group-limited top-2 and normalised weights (top-2 so the router gets a gradient).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xpuserve.demo.tokenizer import build_tokenizer
from xpuserve.models.moe import Router


def config_json() -> dict:
    """The checkpoint's config.json, in the field names DeepSeek's own config uses."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": build_tokenizer().get_vocab_size(),
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 64,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "num_nextn_predict_layers": 0,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_interleave": True,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
        "use_cache": True,
    }


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """build_model leaves storage uninitialised: norms to 1, correction biases to 0, the rest N(0, std).
    Projections that write into the residual stream are scaled down by sqrt(2 * layers), as in GPT-2."""
    residual_scale = 1 / math.sqrt(2 * len(model.model.layers))
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")):
            param.normal_(0.0, std * residual_scale, generator=generator)
        else:
            param.normal_(0.0, std, generator=generator)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.zero_()


class RouterBalancer:
    """Auxiliary-loss-free load balancing (DeepSeek-V3): after each step, raise the selection bias of
    experts that got fewer tokens than average and lower it for those that got more."""

    def __init__(self, model: nn.Module, gamma: float):
        self.gamma = gamma
        self.routers = [m for m in model.modules() if isinstance(m, Router) and m.e_score_correction_bias is not None]
        self.counts = {id(r): torch.zeros_like(r.e_score_correction_bias) for r in self.routers}
        for router in self.routers:
            router.register_forward_hook(self._count)

    def _count(self, router: Router, inputs, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        ids = output[1].detach().flatten()
        self.counts[id(router)] += torch.bincount(ids, minlength=len(router.e_score_correction_bias)).float()

    @torch.no_grad()
    def update(self) -> list[float]:
        """Nudge the biases; returns each router's max load / mean load since the last update."""
        imbalance = []
        for router in self.routers:
            counts = self.counts[id(router)]
            mean = counts.mean()
            router.e_score_correction_bias += self.gamma * torch.sign(mean - counts)
            imbalance.append((counts.max() / mean).item() if mean > 0 else 1.0)
            counts.zero_()
        return imbalance
