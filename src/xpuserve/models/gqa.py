"""Grouped-query attention (Llama, Qwen2) with K and V cached per KV head."""

from __future__ import annotations

import torch
from torch import nn

from xpuserve.config import ModelConfig
from xpuserve.models.attention import attend
from xpuserve.models.context import ForwardContext
from xpuserve.models.linear import Linear, PackedLinear
from xpuserve.models.rotary import apply_rotary


class GQAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = PackedLinear(
            config.hidden_size, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, bias=config.qkv_bias
        )
        o_bias = config.attention_bias and config.architecture == "LlamaForCausalLM"
        self.o_proj = Linear(q_size, config.hidden_size, bias=o_bias)
        self.scale = self.head_dim**-0.5
        self.k_cache: torch.Tensor | None = None  # [slots, kv_heads, head_dim], bound by the runner
        self.v_cache: torch.Tensor | None = None

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-token cache entries this layer needs."""
        return {"k_cache": (self.num_kv_heads, self.head_dim), "v_cache": (self.num_kv_heads, self.head_dim)}

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = apply_rotary(q.view(n, self.num_heads, self.head_dim), *rope, interleaved=False)
        k = apply_rotary(k.view(n, self.num_kv_heads, self.head_dim), *rope, interleaved=False)
        self.k_cache[ctx.slot_mapping] = k.to(self.k_cache.dtype)
        self.v_cache[ctx.slot_mapping] = v.view(n, self.num_kv_heads, self.head_dim).to(self.v_cache.dtype)
        keys, values = self.k_cache[ctx.kv_slots], self.v_cache[ctx.kv_slots]
        out = attend(ctx, q, keys.to(q.dtype), values.to(q.dtype), self.scale)
        return self.o_proj(out.reshape(n, -1))
