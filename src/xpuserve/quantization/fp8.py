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


# Served FP8 keeps one scale per row and 128 columns (the checkpoint's 128 x 128 block scales,
# repeated down the rows), so a layer can be cut by rows: packed projections, tensor-parallel shards.
COLUMN_BLOCK = 128


def dequantize_rows(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [N, K] fp8, scale_inv [N, ceil(K/128)] -> [N, K] in dtype."""
    scale = scale_inv.repeat_interleave(COLUMN_BLOCK, dim=-1)[..., : weight.shape[-1]]
    return (weight.to(torch.float32) * scale).to(dtype)


class Fp8Rows:
    """Load target for rows of a served FP8 weight: takes the checkpoint's FP8 blocks as they are."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor):
        self.weight, self.scale_inv = weight, scale_inv
        self.shape, self.device = weight.shape, weight.device

    def __getitem__(self, rows: slice) -> "Fp8Rows":
        return Fp8Rows(self.weight[rows], self.scale_inv[rows])

    def load_fp8(self, weight: torch.Tensor, block_scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
        if block[1] != COLUMN_BLOCK:
            raise ValueError(f"served FP8 needs {COLUMN_BLOCK}-column blocks, the checkpoint has {block[1]}")
        self.weight.copy_(weight)
        self.scale_inv.copy_(block_scale_inv.repeat_interleave(block[0], dim=0)[: weight.shape[0]])

    def copy_(self, source: torch.Tensor) -> None:
        """A higher-precision weight (an FP8 checkpoint keeps a few in bf16): quantize it here."""
        rows, cols = source.shape
        padded = torch.zeros(rows, self.scale_inv.shape[-1] * COLUMN_BLOCK, dtype=torch.float32, device=source.device)
        padded[:, :cols] = source.float()
        blocks = padded.view(rows, -1, COLUMN_BLOCK)
        scale_inv = (blocks.abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
        self.weight.copy_((blocks / scale_inv[..., None]).view(rows, -1)[:, :cols].to(torch.float8_e4m3fn))
        self.scale_inv.copy_(scale_inv)
