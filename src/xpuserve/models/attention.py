"""Attention over the KV cache for a packed step of prefills and decodes, in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xpuserve.models.context import ForwardContext


def attend(
    ctx: ForwardContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [N, H, D]; k [B, Lk, Hk, D] and v [B, Lk, Hk, Dv] gathered from the cache -> [N, H, Dv].

    H must be a multiple of Hk (grouped-query attention; MLA's absorbed form is Hk = 1).
    """
    q = ctx.pad_queries(q).transpose(1, 2)  # [B, H, Tq, D]
    out = F.scaled_dot_product_attention(
        q,
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=ctx.attn_mask,
        scale=scale,
        enable_gqa=k.shape[2] != q.shape[1],
    )
    return ctx.unpad_queries(out.transpose(1, 2))
