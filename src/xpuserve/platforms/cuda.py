import torch

from xpuserve.platforms.base import Platform


class CudaPlatform(Platform):
    name = "cuda"

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()
