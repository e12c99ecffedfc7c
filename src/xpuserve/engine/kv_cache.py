"""KV cache storage: one flat array of token slots per cache tensor of every attention layer."""

from __future__ import annotations

import torch

from xpuserve.models.decoder import CausalLM


def bytes_per_token(model: CausalLM, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for attn in model.attention_layers():
        for shape in attn.cache_shapes().values():
            total += size * int(torch.Size(shape).numel())
    return total


def allocate_kv_cache(model: CausalLM, num_slots: int, dtype: torch.dtype | None = None) -> None:
    """Give every attention layer its cache tensors ([num_slots, *per-token shape])."""
    device = model.model.embed_tokens.weight.device
    dtype = dtype or model.model.embed_tokens.weight.dtype
    for attn in model.attention_layers():
        for name, shape in attn.cache_shapes().items():
            setattr(attn, name, torch.zeros(num_slots, *shape, dtype=dtype, device=device))
