import importlib

from xpuserve.platforms.base import Platform


class NpuPlatform(Platform):
    """Huawei Ascend through torch_npu, imported only when an NPU is asked for or probed."""

    name = "npu"

    @classmethod
    def is_available(cls) -> bool:
        try:
            torch_npu = importlib.import_module("torch_npu")
        except ImportError:
            return False
        return bool(torch_npu.npu.is_available())

    @classmethod
    def unavailable_reason(cls) -> str:
        if importlib.util.find_spec("torch_npu") is None:
            return "device 'npu' needs torch_npu: install the torch_npu wheel matching your torch and CANN versions"
        return "torch_npu is installed but finds no Ascend NPU (check the driver and ASCEND_RT_VISIBLE_DEVICES)"

    def memory_info(self, device):
        import torch

        return torch.npu.mem_get_info(device)
