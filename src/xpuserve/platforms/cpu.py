import functools

import torch
import torch.nn.functional as F

from xpuserve.platforms.base import Platform


BF16_UPCAST_ROWS = 12


class CpuPlatform(Platform):
    name = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def auto_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        # float16 matmuls on CPUs are slow or emulated; bf16 and float32 are native on current x86/Arm.
        dtype = super().auto_dtype(checkpoint_dtype)
        return torch.float32 if dtype == torch.float16 else dtype

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # CPUs without native bf16 (AVX2) run a bf16 GEMM row by row: at 16 rows and more,
        # converting the weight and multiplying in float32 is several times faster.
        if x.dtype == torch.bfloat16 and x.numel() // x.shape[-1] >= BF16_UPCAST_ROWS and not self.native_bf16:
            bias = None if bias is None else bias.float()
            return F.linear(x.float(), weight.float(), bias).to(torch.bfloat16)
        return F.linear(x, weight, bias)

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Batched bf16 matmuls are slow at any size there; their operands are small (MLA's W_UK / W_UV).
        if a.dtype == torch.bfloat16 and not self.native_bf16:
            return torch.bmm(a.float(), b.float()).to(torch.bfloat16)
        return torch.bmm(a, b)

    def attention_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype == torch.bfloat16 and not self.native_bf16 else dtype

    @functools.cached_property
    def native_bf16(self) -> bool:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
