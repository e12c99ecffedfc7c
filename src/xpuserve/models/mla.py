"""Multi-head latent attention (DeepSeek V2/V3).

Per token and layer the cache holds only the normed latent c_kv (kv_lora_rank values) and the
rotated shared key k_pe (qk_rope_head_dim values). Two ways to attend over it, checked equal
in the tests:
- expanded: project the cached latents up to per-head keys and values (cheap when most keys
  are new, as in a prefill);
- absorbed: fold W_UK into the query and W_UV into the output so attention runs in latent
  space as multi-query attention (cheap when few queries read a long cache, as in decode).
"""

from __future__ import annotations

import torch
from torch import nn

from xpuserve.config import ModelConfig
from xpuserve.models.attention import attend, decode, store_kv
from xpuserve.models.context import ForwardContext
from xpuserve.models.linear import Linear
from xpuserve.models.parallel import ColumnParallelLinear, RowParallelLinear, divide
from xpuserve.models.norm import RMSNorm
from xpuserve.models.rotary import apply_rotary, softmax_scale
from xpuserve.platforms import current_platform


class MLAttention(nn.Module):
    # "auto": absorbed when every sequence of the step adds one token, expanded otherwise.
    mode: str = "auto"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = divide(config.num_attention_heads, "num_attention_heads")  # this rank's heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.interleaved = config.rope_interleave
        # Heads are split across ranks: q/kv up-projections by rows, o_proj by columns; the latent is whole on each.
        hidden, heads, qk_dim = config.hidden_size, config.num_attention_heads, config.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_dim)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        # Kept in the model dtype: the absorbed decode multiplies its halves directly.
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), quantize=False)
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias=config.attention_bias)
        self.scale = softmax_scale(qk_dim, config.rope)
        self.latent_cache: torch.Tensor | None = None  # [slots, kv_lora_rank + rope_dim], bound by the runner

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"latent_cache": (self.kv_lora_rank + self.rope_dim,)}

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(n, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rotary(q_pe, *rope, interleaved=self.interleaved)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rotary(k_pe[:, None, :], *rope, interleaved=self.interleaved)[:, 0]
        latent = torch.cat((self.kv_a_layernorm(c_kv), k_pe), dim=-1)
        store_kv(self.latent_cache, ctx.slot_mapping, latent)
        if ctx.paged_decode:
            out = self._absorbed(ctx, q_nope, q_pe, None)
        else:
            cached = self.latent_cache[ctx.kv_slots].to(x.dtype)  # [B, Lk, kv_lora_rank + rope_dim]
            absorb = self.mode == "absorb" or (self.mode == "auto" and ctx.max_query_len == 1)
            out = self._absorbed(ctx, q_nope, q_pe, cached) if absorb else self._expanded(ctx, q_nope, q_pe, cached)
        return self.o_proj(out.reshape(n, -1))

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]  # W_UK [H, nope, R], W_UV [H, v, R]

    def _expanded(self, ctx, q_nope, q_pe, cached) -> torch.Tensor:
        batch, length, _ = cached.shape
        c_kv, k_pe = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(batch, length, self.num_heads, -1)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.num_heads, -1)), dim=-1)
        return attend(ctx, torch.cat((q_nope, q_pe), dim=-1), k, v, self.scale)

    def _absorbed(self, ctx, q_nope, q_pe, cached) -> torch.Tensor:
        """`cached` [B, Lk, width] gathered from the cache, or None to read it in place (a decode step)."""
        w_uk, w_uv = self._up_weights()
        head_linear = current_platform().head_linear
        q_latent = head_linear(q_nope, w_uk, transposed=True)  # [N, H, R]
        q = torch.cat((q_latent, q_pe), dim=-1)
        if cached is None:
            out_latent = decode(ctx, q, self.latent_cache[:, None], None, self.scale, self.kv_lora_rank)
        else:
            k = cached[:, :, None, :]
            out_latent = attend(ctx, q, k, k[..., : self.kv_lora_rank], self.scale)
        return head_linear(out_latent, w_uv)  # [N, H, v]
