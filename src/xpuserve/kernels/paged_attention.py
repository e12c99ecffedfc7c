"""Decode attention read in place from the paged KV cache, and the cache write: the C++ ops where they
built, else the reference."""

from __future__ import annotations

import torch

from xpuserve.kernels import build

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_fake_registered = False


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float, v_dim: int) -> torch.Tensor:
    """One query per sequence (decode) attending to its cached keys where they lie.

    q [B, H, D] (bfloat16 or float32); k_cache [num_slots, Hk, D]; v_cache [num_slots, Hk, Dv] or None,
    meaning the values are the first v_dim columns of each key (MLA's absorbed form: the cache is the
    latent, Hk = 1); slot of position p of sequence b = block_tables[b, p // block_size] * block_size
    + p % block_size; block_tables int32 [B, max_blocks]; context_lens int32 [B] (>= 1: keys 0..len-1
    are attended). H is a multiple of Hk (query head h reads KV head h // (H // Hk)). Softmax in
    float32. Returns [B, H, v_dim] in q's dtype.
    """
    args = (q, k_cache, v_cache, block_tables, context_lens, block_size, scale, v_dim)
    if q.device.type == "cpu" and q.dtype in KERNEL_DTYPES and k_cache.dtype in KERNEL_DTYPES and kernel_ready():
        return torch.ops.xpuserve_kernels.paged_decode(*args)
    return paged_decode_reference(*args)


def writes_cache(cache: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the C++ op writes `values` into `cache` (write_cache); autograd does not see through it."""
    return (cache.is_cpu and cache.dtype in KERNEL_DTYPES and values.dtype in KERNEL_DTYPES and cache.is_contiguous()
            and not torch.is_grad_enabled() and kernel_ready())


def write_cache(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[slots] = values in the cache's dtype, in place; slots int64 [N], values [N, *cache row shape]."""
    torch.ops.xpuserve_kernels.store_kv(cache, slots, values)


# Dynamo runs this once while tracing and keeps the answer, so the op goes into the graph whole.
@torch.compiler.assume_constant_result
def kernel_ready() -> bool:
    """Whether the C++ op is loaded (building it on the first call) and known to torch.compile."""
    global _fake_registered
    if not build.load():
        return False
    if not _fake_registered:
        torch.library.register_fake("xpuserve_kernels::paged_decode")(_output_like)
        torch.library.register_fake("xpuserve_kernels::store_kv")(lambda cache, slots, values: None)
        _fake_registered = True
    return True


def _output_like(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, v_dim):
    return q.new_empty(q.shape[0], q.shape[1], v_dim)


def paged_decode_reference(q, k_cache, v_cache, block_tables, context_lens, block_size: int, scale: float, v_dim: int) -> torch.Tensor:
    """The oracle: per sequence, gather its slots, then softmax(q k^T) v in float32."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    out = q.new_empty(q.shape[0], heads, v_dim)
    for b, length in enumerate(context_lens.tolist()):
        pos = torch.arange(length, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache[slots].float()  # [L, Hk, D]
        v = k[..., :v_dim] if v_cache is None else v_cache[slots, :, :v_dim].float()
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
