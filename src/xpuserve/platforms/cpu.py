import torch

from xpuserve.platforms.base import Platform


class CpuPlatform(Platform):
    name = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def auto_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        # float16 matmuls on CPUs are slow or emulated; bf16 and float32 are native on current x86/Arm.
        dtype = super().auto_dtype(checkpoint_dtype)
        return torch.float32 if dtype == torch.float16 else dtype
