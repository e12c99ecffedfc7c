"""Grouped-query attention (Llama, Qwen2) with K and V cached per KV head."""

from __future__ import annotations

import torch
from torch import nn

from xpuserve.config import ModelConfig
from xpuserve.distributed import parallel_state
from xpuserve.models.attention import attend, decode, store_kv
from xpuserve.models.context import ForwardContext
from xpuserve.models.parallel import PackedColumnParallelLinear, RowParallelLinear, rank_range
from xpuserve.models.rotary import apply_rotary


class GQAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = dim = config.head_dim
        heads, kv_heads = rank_heads(config.num_attention_heads, config.num_key_value_heads)
        self.num_heads, self.num_kv_heads = heads[1] - heads[0], kv_heads[1] - kv_heads[0]
        q_rows, kv_rows = (heads[0] * dim, heads[1] * dim), (kv_heads[0] * dim, kv_heads[1] * dim)
        self.qkv_proj = PackedColumnParallelLinear(
            config.hidden_size, bias=config.qkv_bias, ranges={"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}
        )
        o_bias = config.attention_bias and config.architecture == "LlamaForCausalLM"
        self.o_proj = RowParallelLinear(config.num_attention_heads * dim, config.hidden_size, bias=o_bias)
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
        store_kv(self.k_cache, ctx.slot_mapping, k)
        store_kv(self.v_cache, ctx.slot_mapping, v.view(n, self.num_kv_heads, self.head_dim))
        if ctx.paged_decode:
            out = decode(ctx, q, self.k_cache, self.v_cache, self.scale, self.head_dim)
        else:
            keys, values = self.k_cache[ctx.kv_slots], self.v_cache[ctx.kv_slots]
            out = attend(ctx, q, keys.to(q.dtype), values.to(q.dtype), self.scale)
        return self.o_proj(out.reshape(n, -1))


def rank_heads(num_heads: int, num_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's query heads and the KV heads they read: KV heads split like the query heads
    when there are enough, otherwise each rank keeps the one its query heads share."""
    heads = rank_range(num_heads, "num_attention_heads")
    ranks = parallel_state().tp_size
    if num_kv_heads % ranks == 0:
        return heads, rank_range(num_kv_heads, "num_key_value_heads")
    if ranks % num_kv_heads:
        raise ValueError(f"num_key_value_heads {num_kv_heads} and --tensor-parallel-size {ranks}: one must divide the other")
    kv = heads[0] // (num_heads // num_kv_heads)
    return heads, (kv, kv + 1)
