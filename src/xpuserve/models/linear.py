"""Linear layers whose weights may be packed from several checkpoint tensors and stored in
the serving format: float, INT8 with per-row scales, or FP8 with per-row, per-128-column scales."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from xpuserve.quantization import fp8
from xpuserve.quantization.int8 import Int8Rows
from xpuserve.platforms import current_platform


@dataclass(frozen=True)
class WeightFormat:
    kind: str = "float"  # "float" (the model dtype), "int8" or "fp8"
    int8_activations: bool = False  # W8A8: quantize each token's activations too


_format: ContextVar[WeightFormat] = ContextVar("weight_format", default=WeightFormat())


def current_weight_format() -> WeightFormat:
    return _format.get()


@contextmanager
def weight_format(fmt: WeightFormat):
    """Linear layers built inside store their weights in `fmt` (build_model sets it)."""
    token = _format.set(fmt)
    try:
        yield
    finally:
        _format.reset(token)


def quantized_weight(shape: tuple[int, ...], kind: str) -> tuple[nn.Parameter, nn.Parameter | None]:
    """Storage for a weight of `shape` ([..., out, in]) and its scales, uninitialised."""
    if kind == "float":
        return nn.Parameter(torch.empty(shape)), None
    *lead, _, cols = shape
    if kind == "int8":
        q, scale = torch.empty(shape, dtype=torch.int8), torch.empty(shape[:-1], dtype=torch.float32)
    elif kind == "fp8":
        blocks = -(-cols // fp8.COLUMN_BLOCK)
        q, scale = torch.empty(shape, dtype=torch.float8_e4m3fn), torch.empty(*shape[:-1], blocks, dtype=torch.float32)
    else:
        raise ValueError(f"unknown weight format '{kind}'")
    return nn.Parameter(q, requires_grad=False), nn.Parameter(scale, requires_grad=False)


def weight_rows(weight: torch.Tensor, scale: torch.Tensor | None, rows: slice | int, model_dtype: torch.dtype):
    """Load target for some rows of a weight (or one expert of a stacked weight)."""
    if scale is None:
        return weight.data[rows]
    if weight.dtype == torch.int8:
        return Int8Rows(weight.data[rows], scale.data[rows], via=model_dtype)
    return fp8.Fp8Rows(weight.data[rows], scale.data[rows])


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None = None,
           int8_activations: bool = False) -> torch.Tensor:
    """x @ weight^T (+ bias) for a weight in any serving format."""
    platform = current_platform()
    if scale is None:
        return platform.linear(x, weight, bias)
    if weight.dtype == torch.int8:
        return (platform.w8a8_linear if int8_activations else platform.int8_linear)(x, weight, scale, bias)
    return platform.fp8_linear(x, weight, scale, bias)


class Linear(nn.Module):
    """y = x W^T + b, with uninitialised storage: weights always come from a checkpoint.

    `quantize=False` keeps a layer in the model dtype whatever the format (MLA's kv_b_proj, whose
    halves the absorbed decode multiplies directly).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quantize: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fmt = current_weight_format() if quantize else WeightFormat()
        self.int8_activations = fmt.int8_activations
        self.model_dtype = torch.get_default_dtype()
        self.weight, self.weight_scale = quantized_weight((out_features, in_features), fmt.kind)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.weight_scale, self.bias, self.int8_activations)

    def checkpoint_views(self, name: str) -> dict[str, object]:
        views = {f"{name}.weight": weight_rows(self.weight, self.weight_scale, slice(None), self.model_dtype)}
        if self.bias is not None:
            views[f"{name}.bias"] = self.bias.data
        return views


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

    def checkpoint_views(self, name: str) -> dict[str, object]:
        parent = name.rpartition(".")[0]
        views, row = {}, 0
        for part, size in self.parts.items():
            views[f"{parent}.{part}.weight"] = weight_rows(self.weight, self.weight_scale, slice(row, row + size), self.model_dtype)
            if self.bias is not None:
                views[f"{parent}.{part}.bias"] = self.bias.data[row : row + size]
            row += size
        return views
