"""Attention over the KV cache for a packed step: in place through the block tables on decode
steps (xpuserve.kernels), in plain PyTorch over padded views otherwise (and as the reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xpuserve.kernels.paged_attention import paged_decode_attention
from xpuserve.models.context import ForwardContext
from xpuserve.platforms import current_platform

# Above this many query rows per KV head, scores are too big to materialise: use SDPA instead.
MAX_FOLDED_ROWS = 4096


def store_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slots] = values. A compiled step calls it as one operator, which writes the cache in
    place; eagerly (and in training, where autograd must see the write) it is plain indexing."""
    if torch.compiler.is_compiling():
        _store_kv(cache, slots, values)
    else:
        write_kv(cache, slots, values)


def write_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    cache[slots] = values.to(cache.dtype)


_store_kv = torch.library.custom_op("xpuserve::store_kv", write_kv, mutates_args=("cache",))


@_store_kv.register_fake
def _(cache, slots, values) -> None:
    return None


def decode(ctx: ForwardContext, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
           scale: float, v_dim: int) -> torch.Tensor:
    """q [B, H, D], one token per sequence -> [B, H, v_dim], keys and values read where they lie."""
    return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, ctx.block_size, scale, v_dim)


def attend(
    ctx: ForwardContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [N, H, D]; k [B, Lk, Hk, D] and v [B, Lk, Hk, Dv] gathered from the cache -> [N, H, Dv].

    H must be a multiple of Hk (grouped-query attention; MLA's absorbed form is Hk = 1).
    """
    dtype = q.dtype
    compute = current_platform().attention_dtype(dtype)
    q = ctx.pad_queries(q).to(compute)  # [B, Tq, H, D]
    k, v = k.to(compute), v.to(compute)
    group = q.shape[2] // k.shape[2]
    if ctx.max_query_len * group <= MAX_FOLDED_ROWS:
        out = _folded(q, k, v, ctx.attn_mask, scale)
    else:
        out = _sdpa(q, k, v, ctx.attn_mask, scale)
    return ctx.unpad_queries(out).to(dtype)


def _folded(q, k, v, mask, scale) -> torch.Tensor:
    """The query heads that share a KV head become rows of one matmul: no copies of K or V per head."""
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    rows = q.view(batch, q_len, kv_heads, group, dim).permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, q_len * group, dim)
    scores = torch.matmul(rows, k.permute(0, 2, 3, 1)).float() * scale  # [B, Hk, Tq * G, Lk]
    scores.masked_fill_(~mask.repeat_interleave(group, dim=2), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3))  # [B, Hk, Tq * G, Dv]
    return out.view(batch, kv_heads, q_len, group, -1).permute(0, 2, 1, 3, 4).reshape(batch, q_len, heads, -1)


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
