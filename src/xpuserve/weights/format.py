"""Which dtype and weight format to serve a checkpoint in on a platform, and why."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xpuserve.config import QUANTIZATIONS, ModelConfig
from xpuserve.models.linear import WeightFormat
from xpuserve.platforms.base import Platform



@dataclass(frozen=True)
class ServingFormat:
    dtype: torch.dtype  # activations and every weight not quantized (norms, embedding, router)
    weights: WeightFormat
    reason: str

    def describe(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        kind = {"float": name, "int8": "int8 (W8A8)" if self.weights.int8_activations else "int8 weight-only", "fp8": "fp8"}
        return f"weights {kind[self.weights.kind]}, activations {name}: {self.reason}"


def choose_format(platform: Platform, config: ModelConfig, dtype: str | torch.dtype = "auto",
                  quantization: str | None = None) -> ServingFormat:
    method = config.quantization.quant_method if config.quantization else None
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantization '{quantization}' is not supported; use one of {', '.join(QUANTIZATIONS)}")
    if quantization == "int8" or method == "int8":
        w8a8 = platform.int8_activations()
        why = "--quantization int8" if quantization else "an INT8 checkpoint"
        how = f"{platform.name} has a fast INT8 matmul" if w8a8 else f"{platform.name} has no fast INT8 matmul, activations stay float"
        weights, reason = WeightFormat("int8", w8a8), f"{why}; {how}"
    elif method == "fp8" and "fp8" in platform.matmul_kinds():
        # Half the memory of bf16. The matmul itself still dequantizes per call: no FP8 GEMM kernel yet.
        weights, reason = WeightFormat("fp8"), f"FP8 checkpoint kept in FP8: {platform.name} has FP8 matmul units"
    elif method == "fp8":
        weights = WeightFormat()
        reason = f"FP8 checkpoint dequantized on load: {platform.name} has no FP8 matmul (--quantization int8 halves the memory)"
    else:
        weights, reason = WeightFormat(), f"checkpoint in {config.torch_dtype or 'an unstated dtype'}"
    if dtype == "auto":
        act_dtype, why_dtype = platform.auto_dtype(config.torch_dtype, weights.kind)
        reason += f"; {why_dtype}"
    else:
        act_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        reason += "; dtype as asked"
    return ServingFormat(act_dtype, weights, reason)
