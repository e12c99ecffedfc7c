"""Attention over the KV cache for a packed step: in place through the block tables on decode
steps (xpuserve.kernels), through SDPA over padded views otherwise (and as the reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xpuserve.kernels.paged_attention import paged_decode_attention, write_cache, writes_cache
from xpuserve.models.context import ForwardContext
from xpuserve.platforms import current_platform


def store_kv(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slots] = values. The C++ op where it applies (one call, in place, in a compiled step too);
    otherwise a compiled step calls plain indexing as one operator, which writes the cache in place,
    and eagerly (and in training, where autograd must see the write) it is plain indexing."""
    if writes_cache(cache, values):
        write_cache(cache, slots, values)
    elif torch.compiler.is_compiling():
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

    H must be a multiple of Hk (grouped-query attention; MLA's absorbed form is Hk = 1). Runs as
    torch's SDPA: on CPU its flash kernel, an online softmax over blocks of keys, so no [Tq, Lk]
    score matrix exists; it takes one head size for q, k and v, so shorter values get zero columns.
    """
    dtype, dv = q.dtype, v.shape[-1]
    compute = current_platform().attention_dtype(dtype)
    q = ctx.pad_queries(q).to(compute)  # [B, Tq, H, D]
    k, v = k.to(compute), v.to(compute)
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx.attn_mask,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return ctx.unpad_queries(out.transpose(1, 2)[..., :dv]).to(dtype)
