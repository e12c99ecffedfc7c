import torch
import torch.nn.functional as F

from xpuserve.platforms.base import Platform

# torch._int_mm on CUDA wants more than 16 rows; smaller batches are padded up to this.
INT_MM_MIN_ROWS = 32


def matmul_kinds(capability: tuple[int, int]) -> frozenset[str]:
    """Tensor-core input types by compute capability: INT8 since Turing (sm_75), bf16 since
    Ampere (sm_80), FP8 since Ada/Hopper (sm_89, sm_90: H100, H800, H200, H20)."""
    kinds = {"fp16", "int8"}
    if capability >= (8, 0):
        kinds.add("bf16")
    if capability >= (8, 9):
        kinds.add("fp8")
    return frozenset(kinds)


class CudaPlatform(Platform):
    name = "cuda"
    dist_backend = "nccl"

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str:
        if torch.version.cuda is None:
            return "device 'cuda' needs a CUDA build of torch; this one is CPU-only (pip install torch from the CUDA index)"
        return "this torch has CUDA but finds no GPU (check the driver and CUDA_VISIBLE_DEVICES)"

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def device_name(self, device: torch.device) -> str:
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"

    def memory_info(self, device: torch.device) -> tuple[int, int]:
        return torch.cuda.mem_get_info(device)

    def synchronize(self, device: torch.device | None = None) -> None:
        torch.cuda.synchronize(device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        bf16 = (torch.bfloat16,) if torch.cuda.is_bf16_supported() else ()
        return (torch.float32, torch.float16, *bf16)

    def matmul_kinds(self) -> frozenset[str]:
        return matmul_kinds(torch.cuda.get_device_capability())

    def int8_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape[1] % 8 or b.shape[0] % 8:  # cuBLASLt's INT8 GEMM wants both dimensions in multiples of 8
            return (a.float() @ b.float().t()).round().to(torch.int32)
        rows = a.shape[0]
        if rows < INT_MM_MIN_ROWS:
            a = F.pad(a, (0, 0, 0, INT_MM_MIN_ROWS - rows))
        return torch._int_mm(a, b.t())[:rows]
