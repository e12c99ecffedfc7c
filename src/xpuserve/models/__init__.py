"""Model code: one file per architecture family, built from the shared layers beside them."""

from __future__ import annotations

import torch

from xpuserve.config import ModelConfig
from xpuserve.models.decoder import CausalLM
from xpuserve.models.deepseek import DeepseekForCausalLM
from xpuserve.models.linear import WeightFormat, weight_format
from xpuserve.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
}


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                weights: WeightFormat = WeightFormat()) -> CausalLM:
    """An uninitialised model with parameters on `device` in `dtype` (routers stay float32),
    linear layers in the `weights` format."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), weight_format(weights):
            return MODEL_CLASSES[config.architecture](config).eval()
    finally:
        torch.set_default_dtype(previous)
