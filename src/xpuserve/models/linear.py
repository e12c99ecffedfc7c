"""Linear layers whose weights may be packed from several checkpoint tensors."""

from __future__ import annotations

import torch
from torch import nn

from xpuserve.platforms import current_platform


class Linear(nn.Module):
    """y = x W^T + b, with uninitialised storage: weights always come from a checkpoint."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return current_platform().linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """Several projections of the same input in one matmul (q/k/v, gate/up).

    `parts` names the checkpoint modules, siblings of this one, in output order, with their
    output sizes; each loads into its own rows of the packed weight.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(parts.values()), bias)
        self.parts = parts

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(list(self.parts.values()), dim=-1)

    def checkpoint_views(self, name: str) -> dict[str, torch.Tensor]:
        parent = name.rpartition(".")[0]
        views, row = {}, 0
        for part, size in self.parts.items():
            views[f"{parent}.{part}.weight"] = self.weight.data[row : row + size]
            if self.bias is not None:
                views[f"{parent}.{part}.bias"] = self.bias.data[row : row + size]
            row += size
        return views
