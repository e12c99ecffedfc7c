"""INT8 with symmetric per-output-channel weight scales and dynamic per-token activation scales.

weight ≈ q * scale[row], q in [-127, 127]; the same for activations, one scale per token.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] float -> (int8 [..., N, K], float32 scale [..., N])."""
    w = weight.float()
    scale = (w.abs().amax(dim=-1) / INT8_MAX).clamp(min=1e-12)
    q = (w / scale[..., None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> (int8 [..., K], float32 scale [...]): each token's own range."""
    return quantize(x)


class Int8Rows:
    """Load target for rows of an INT8 weight and their scales.

    Accepts what the loader has: a float tensor (quantized here, after rounding to `via` — the
    dtype an unquantized model would hold, so FP8 -> INT8 equals FP8 -> bf16 -> INT8), an INT8
    tensor with its scales (a converted checkpoint), or row slices (FP8 dequantized block-row by
    block-row, never the whole layer in float).
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, via: torch.dtype):
        self.weight, self.scale, self.via = weight, scale, via
        self.shape, self.device = weight.shape, weight.device

    def __getitem__(self, rows: slice) -> "Int8Rows":
        return Int8Rows(self.weight[rows], self.scale[rows], self.via)

    def copy_(self, source: torch.Tensor) -> None:
        q, scale = quantize(source.to(self.via))
        self.weight.copy_(q)
        self.scale.copy_(scale)

    def load_int8(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight.copy_(q)
        self.scale.copy_(scale.reshape(self.scale.shape))


def load_into(target, q: torch.Tensor, scale: torch.Tensor) -> None:
    """An INT8 checkpoint tensor with its row scales into a load target: kept as INT8 by Int8Rows,
    dequantized into a float tensor view."""
    q, scale = q.to(target.device), scale.to(target.device)
    if isinstance(target, Int8Rows):
        target.load_int8(q, scale)
    else:
        target.copy_(dequantize(q, scale))
