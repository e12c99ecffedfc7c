"""What this CPU can do, read once: the instruction sets the CPU kernels depend on, and which of
ATen's kernel sets (DEFAULT, AVX2, AVX512) torch dispatches to. CpuPlatform chooses every kernel
from a CpuFeatures; tests build one by hand to take the paths another CPU would."""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch

# The flags that change a kernel choice, as /proc/cpuinfo spells them.
ISA_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "amx_int8")
# ATen's CPU kernel sets, weakest first; ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers the choice.
ATEN_LEVELS = ("DEFAULT", "AVX2", "AVX512")


@dataclass(frozen=True)
class CpuFeatures:
    model: str
    flags: frozenset[str]
    aten: str  # the kernel set torch dispatches to: one of ATEN_LEVELS
    onednn_bf16: bool  # oneDNN runs bf16 GEMMs itself (AVX-512 core, AVX512-BF16 or AMX-BF16)

    def isa_names(self) -> list[str]:
        return [flag for flag in ISA_FLAGS if flag in self.flags]

    def describe(self) -> str:
        """One line for benchmark reports: the model, its instruction sets, torch's kernel set."""
        return f"{self.model} ({', '.join(self.isa_names()) or 'no AVX2'}; ATen {self.aten} kernels)"

    def bf16_engine(self) -> str:
        """The unit oneDNN's bf16 GEMM runs on, or why there is none."""
        if not self.onednn_bf16:
            return "none (no AVX-512)"
        for flag, unit in (("amx_bf16", "AMX-BF16 tiles"), ("avx512_bf16", "AVX512-BF16 dot products")):
            if flag in self.flags:
                return unit
        return "AVX-512, bf16 widened to float32 in registers"


def cpu_model_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def aten_level() -> str:
    """The kernel set torch dispatches to in this process."""
    level = torch.backends.cpu.get_cpu_capability().upper()
    return level if level in ATEN_LEVELS else "DEFAULT"  # e.g. ZVECTOR or SVE: none of the x86 kernels below


@functools.cache
def detect() -> CpuFeatures:
    flags = frozenset(_cpuinfo().get("flags", "").split()) & frozenset(ISA_FLAGS)
    return CpuFeatures(cpu_model_name(), flags, aten_level(), bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
