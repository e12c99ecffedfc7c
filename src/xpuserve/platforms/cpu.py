import functools
import os
import platform

import torch
import torch.nn.functional as F

from xpuserve.platforms.base import Platform


BF16_UPCAST_ROWS = 12


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuPlatform(Platform):
    name = "cpu"
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_name(self, device: torch.device) -> str:
        return f"{cpu_model_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)  # float16 matmuls are emulated and slow on CPUs

    def matmul_kinds(self) -> frozenset[str]:
        return frozenset({"bf16"} if self.native_bf16 else set())

    def int8_activations(self) -> bool:
        # torch._int_mm runs on CPUs but without VNNI/AMX it is slower than weight-only INT8.
        return False

    def auto_dtype(self, checkpoint_dtype: str | None, weight_kind: str = "float") -> tuple[torch.dtype, str]:
        if weight_kind == "int8":
            return torch.bfloat16, "bf16: the CPU's INT8 weight kernel takes bf16 activations"
        dtype, reason = super().auto_dtype(checkpoint_dtype, weight_kind)
        if dtype == torch.float16:
            return torch.float32, "float32: float16 matmuls are emulated on CPUs"
        if dtype == torch.bfloat16 and not self.native_bf16:
            return torch.float32, "float32: this CPU has no native bf16 (no AVX512-BF16/AMX)"
        return dtype, reason

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # CPUs without native bf16 (AVX2) run a bf16 GEMM row by row: at 16 rows and more,
        # converting the weight and multiplying in float32 is several times faster.
        if x.dtype == torch.bfloat16 and x.numel() // x.shape[-1] >= BF16_UPCAST_ROWS and not self.native_bf16:
            bias = None if bias is None else bias.float()
            return F.linear(x.float(), self._as_float32(weight), bias).to(torch.bfloat16)
        return F.linear(x, weight, bias)

    def _as_float32(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight converted into one reused buffer: a fresh float32 copy of a large weight
        costs a page fault per 4 KiB on every call (measured: lm_head 32000x1024, 80 ms -> 39 ms)."""
        size = weight.numel()
        if self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=torch.float32)
        return self._scratch[:size].view(weight.shape).copy_(weight)

    def int8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # PyTorch's weight-only INT8 kernel: fast for bf16 inputs, slow for float32 ones; it
        # crashes (segfault, torch 2.13) when the input width is not a multiple of 8.
        if x.dtype != torch.bfloat16 or x.shape[-1] % 8:
            return super().int8_linear(x, weight, scale, bias)
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), weight, scale.to(x.dtype))
        y = y.view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Batched bf16 matmuls are slow at any size there; their operands are small (MLA's W_UK / W_UV).
        if a.dtype == torch.bfloat16 and not self.native_bf16:
            return torch.bmm(a.float(), b.float()).to(torch.bfloat16)
        return torch.bmm(a, b)

    def attention_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype == torch.bfloat16 and not self.native_bf16 else dtype

    def memory_info(self, device: torch.device) -> None:
        return None  # host memory: the engine takes a fixed KV budget unless told otherwise

    _scratch = torch.empty(0)

    @functools.cached_property
    def native_bf16(self) -> bool:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
