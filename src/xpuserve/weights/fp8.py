"""DeepSeek's block FP8 format: float8_e4m3fn weights with one float32 `weight_scale_inv` per
block (128 x 128 in the released checkpoints; edge blocks are partial). weight = fp8 * scale_inv.
"""

from __future__ import annotations

import torch

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
SCALE_SUFFIX = "_scale_inv"


def dequantize_into(out: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    """Write the dequantized weight into `out`, one row of blocks at a time (no full float32 copy)."""
    rows, cols = weight.shape
    block_rows, block_cols = block
    expected = (-(-rows // block_rows), -(-cols // block_cols))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} in {block} blocks; expected {expected}")
    for i, r in enumerate(range(0, rows, block_rows)):
        strip = weight[r : r + block_rows].to(torch.float32)
        scale = scale_inv[i].to(torch.float32).repeat_interleave(block_cols)[:cols]
        out[r : r + block_rows].copy_(strip * scale)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    dequantize_into(out, weight, scale_inv, block)
    return out


def quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, as DeepSeek's release does it: scale each block so its largest |value| maps to 448."""
    rows, cols = weight.shape
    block_rows, block_cols = block
    n_r, n_c = -(-rows // block_rows), -(-cols // block_cols)
    padded = torch.zeros(n_r * block_rows, n_c * block_cols, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(n_r, block_rows, n_c, block_cols)
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale_inv[:, None, :, None]).view_as(padded)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv
