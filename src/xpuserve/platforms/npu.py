"""Huawei Ascend through torch_npu, imported only when an NPU is asked for or probed.

Ascend 910B/910C have no FP8 units: FP8 checkpoints are served as bf16 or INT8 (W8A8 through
torch_npu's quantized matmul, as Huawei's own stack serves R1).
"""

import importlib
import importlib.util

import torch

from xpuserve.platforms.base import Platform


def torch_npu():
    return importlib.import_module("torch_npu")


class NpuPlatform(Platform):
    name = "npu"
    dist_backend = "hccl"

    @classmethod
    def is_available(cls) -> bool:
        try:
            return bool(torch_npu().npu.is_available())
        except ImportError:
            return False

    @classmethod
    def unavailable_reason(cls) -> str:
        if importlib.util.find_spec("torch_npu") is None:
            return ("device 'npu' needs torch_npu, which is not installed: "
                    "pip install the torch_npu release matching your torch and CANN versions")
        return "torch_npu is installed but finds no Ascend NPU (check the driver, CANN and ASCEND_RT_VISIBLE_DEVICES)"

    def device_count(self) -> int:
        return torch_npu().npu.device_count()

    def device_name(self, device: torch.device) -> str:
        return torch_npu().npu.get_device_name(device)

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return torch_npu().npu.mem_get_info(device)

    def synchronize(self, device: torch.device | None = None) -> None:
        torch_npu().npu.synchronize(device)

    def empty_cache(self) -> None:
        torch_npu().npu.empty_cache()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.float16, torch.bfloat16)

    def matmul_kinds(self) -> frozenset[str]:
        return frozenset({"bf16", "fp16", "int8"})

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch_npu().npu_rms_norm(x, weight, epsilon=eps)[0]

    def int8_linear(self, x, weight, scale, bias=None):
        # Weight-only INT8: the fused kernel takes the weight as [K, N] and scales in x's dtype.
        return torch_npu().npu_weight_quant_batchmatmul(x, weight.t(), scale.to(x.dtype), bias=bias)

    def w8a8_linear(self, x, weight, scale, bias=None):
        npu = torch_npu()
        x_q, x_scale = npu.npu_dynamic_quant(x)
        y = npu.npu_quant_matmul(x_q, weight.t(), scale.float(), pertoken_scale=x_scale.flatten(), output_dtype=x.dtype)
        return y if bias is None else y + bias
