"""Run by test_cpu_kinds.py under ATEN_CPU_CAPABILITY=<level>: CpuPlatform.int8_linear at widths
1..80 and the crash report's, 1 to 16 rows (xpuserve's GEMM) and just above GEMM_MAX_ROWS (torch's
INT8 kernel, whose domain the platform guards), misaligned inputs too, against the dequantized weight.
Prints one JSON line: the level torch ran, cases checked, wrong cases, widths tried and those the
kernel took."""

import json

import torch

from xpuserve.platforms.cpu import GEMM_MAX_ROWS, CpuPlatform
from xpuserve.quantization import int8

WIDTHS = sorted(set(range(1, 81)) | {120, 136, 172, 200, 256, 1000, 1008, 1016, 1024})
kernel_widths: set[int] = set()
kernel = torch._weight_int8pack_mm


def counting_kernel(x, w, scale):
    kernel_widths.add(x.shape[-1])
    return kernel(x, w, scale)


def check(cpu: CpuPlatform, rows: int, k: int, offset: int = 0) -> bool:
    w, scale = int8.quantize(torch.randn(22, k))
    x = torch.randn(offset + rows * k + 64).bfloat16()[offset: offset + rows * k].view(rows, k)
    ref = x.float() @ int8.dequantize(w, scale).t()
    return bool((cpu.int8_linear(x, w, scale).float() - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-3)


def main() -> None:
    torch._weight_int8pack_mm = counting_kernel
    cpu = CpuPlatform()
    many = GEMM_MAX_ROWS + 1
    cases = [(rows, k, 0) for k in WIDTHS for rows in (1, 2, 5, 16, many, many + 2)]
    cases += [(rows, 64, off) for off in range(1, 8) for rows in (2, 16, many)]
    wrong = [case for case in cases if not check(cpu, *case)]
    print(json.dumps({"aten": cpu.features.aten, "checked": len(cases), "wrong": wrong, "widths": WIDTHS, "kernel_widths": sorted(kernel_widths)}))


if __name__ == "__main__":
    main()
