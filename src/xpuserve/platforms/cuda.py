import torch

from xpuserve.platforms.base import Platform


class CudaPlatform(Platform):
    name = "cuda"

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)
