import os

import torch
import torch.nn.functional as F

from xpuserve.kernels import gemm
from xpuserve.kernels.build import kernel_status
from xpuserve.platforms.base import Platform
from xpuserve.platforms.compiled_layers import CompiledLayers
from xpuserve.platforms.cpu_features import ATEN_LEVELS, CpuFeatures, aten_level, cpu_model_name, detect

# CPUs without oneDNN bf16 (AVX2) run torch's bf16 GEMM row by row: from this many rows on, converting
# the weight and multiplying in float32 is several times faster.
BF16_UPCAST_ROWS = 12
# Up to this many rows xpuserve's C++ GEMM (kernels/gemm.py: each weight row read once for all rows,
# widened in registers) beats both torch's bf16 GEMM and float32 on an upcast weight, and torch's
# INT8 kernel: 1.3x-6x on this project's AVX2 EPYC (docs/benchmarks.md). Measured up to 64 rows.
GEMM_MAX_ROWS = 64

# torch._weight_int8pack_mm (aten/src/ATen/native/cpu/int8mm_kernel.cpp, torch 2.13) has a kernel per
# ATen level. For bf16 activations the AVX2 one reads them 8 at a time with 16-byte *aligned* loads,
# the AVX512 one 16 at a time with 32-byte aligned loads and its int8 weight rows 16 bytes at a time,
# aligned too; neither handles a remainder of K, and row r starts r*K elements in. Outside that domain
# the kernel reads past rows (wrong sums) or faults (a segfault that takes the server down). At the
# DEFAULT level x86 runs a scalar loop, right at any K (2.3 ms vs 14 ms dequantizing for 1 row of
# 1024 x 2048 here), and aarch64 a NEON kernel that steps K by 8. Float32 and float16 inputs take the
# scalar loop at every level. Swept over K = 1..1024 on each level this CPU runs: docs/platforms.md.
INT8PACK_K_MULTIPLE = {"DEFAULT": 8, "AVX2": 8, "AVX512": 16}
INT8PACK_INPUT_ALIGN = {"DEFAULT": 1, "AVX2": 16, "AVX512": 32}  # bytes
INT8PACK_WEIGHT_ALIGN = {"DEFAULT": 1, "AVX2": 1, "AVX512": 16}


def int8pack_accepts(level: str, dtype: torch.dtype, width: int, weight: torch.Tensor) -> bool:
    """Whether torch's INT8 kernel at ATen `level` handles inputs of `dtype` and `width` against `weight`
    (the input's alignment is the caller's to fix: a misaligned input is copied)."""
    return (dtype == torch.bfloat16 and width % INT8PACK_K_MULTIPLE[level] == 0
            and weight.is_contiguous() and weight.data_ptr() % INT8PACK_WEIGHT_ALIGN[level] == 0)


def _unmarked_dims(guards) -> list[bool]:
    # Dynamo's checks, five per parameter, that no dimension was marked dynamic (mark_dynamic) since the
    # compile: nothing here marks any, and they were about a third of a decode layer's guard time.
    return [g.guard_type != "DIMENSION_DYNAMIC_MARKING_GUARD" for g in guards]


# At batch 1 a compiled layer's Python around the graph cost as much as its kernels (2-core EPYC, the
# benchmark model: ~0.7 ms of wrapper, ~0.45 ms of guards per layer): the wrapper in C++, no size
# asserts, fewer guards halve that (docs/benchmarks.md, session 7).
COMPILE_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "guard_filter_fn": _unmarked_dims}


class CpuPlatform(Platform):
    name = "cpu"
    dist_backend = "gloo"

    def __init__(self, features: CpuFeatures | None = None):
        self.features = features or detect()
        # A kernel set weaker than torch's would admit shapes torch's stronger kernel crashes on;
        # run the process with ATEN_CPU_CAPABILITY set to take a weaker one for real.
        if ATEN_LEVELS.index(self.features.aten) < ATEN_LEVELS.index(aten_level()):
            raise ValueError(f"features say ATen {self.features.aten} but torch runs {aten_level()}; "
                             f"set ATEN_CPU_CAPABILITY={self.features.aten.lower()} before torch starts")
        self._scratch = torch.empty(0)

    @classmethod
    def is_available(cls) -> bool:
        return True

    def device_name(self, device: torch.device) -> str:
        return f"{cpu_model_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)  # float16 matmuls are emulated and slow on CPUs

    @property
    def native_bf16(self) -> bool:
        return self.features.onednn_bf16

    @property
    def bf16_upcast_rows(self) -> int | None:
        """Rows from which a bf16 matmul runs in float32 on an upcast weight; None with oneDNN bf16."""
        return None if self.native_bf16 else BF16_UPCAST_ROWS

    def matmul_kinds(self) -> frozenset[str]:
        return frozenset({"bf16"} if self.native_bf16 else set())

    def int8_activations(self) -> bool:
        # torch._int_mm runs on CPUs, but no measurement yet shows it beating weight-only INT8
        # (without VNNI/AMX it is slower); weight-only it stays until one does.
        return False

    def kernels(self) -> dict[str, str]:
        level = self.features.aten
        few = f"xpuserve GEMM, {gemm.status()}, up to {GEMM_MAX_ROWS} rows; "
        if self.native_bf16:
            bf16 = f"oneDNN bf16 GEMM on {self.features.bf16_engine()}"
        else:
            bf16 = few + "from there float32 GEMM on an upcast weight"
        int8 = (few + f"from there torch._weight_int8pack_mm ({level} kernel) for bf16 inputs of width K % "
                f"{INT8PACK_K_MULTIPLE[level]} == 0, otherwise dequantize, then the bf16 matmul")
        attention = "bf16" if self.native_bf16 else "float32 (bf16 inputs upcast)"
        return {"bf16 matmul": bf16, "INT8 weight-only": int8,
                "INT8 activations (W8A8)": "off (weight-only INT8)", "prefill attention": attention,
                "decode attention": f"paged, in place: {kernel_status()}",
                "decode step": "compiled (inductor, per decoder layer; --enforce-eager: eager)" if self.captures_decode else "eager"}

    def auto_dtype(self, checkpoint_dtype: str | None, weight_kind: str = "float") -> tuple[torch.dtype, str]:
        if weight_kind == "int8":
            return torch.bfloat16, "bf16: the CPU's INT8 weight kernel takes bf16 activations"
        dtype, reason = super().auto_dtype(checkpoint_dtype, weight_kind)
        if dtype == torch.float16:
            return torch.float32, "float32: float16 matmuls are emulated on CPUs"
        if dtype == torch.bfloat16 and not self.native_bf16:
            if not gemm.available():
                return torch.float32, "float32: this CPU has no native bf16 (no AVX512-BF16/AMX) and xpuserve's GEMM did not build"
            return dtype, f"{reason}: no native bf16 here, but xpuserve's GEMM widens bf16 weights in registers (half the bytes of float32)"
        return dtype, reason

    @property
    def captures_decode(self) -> bool:
        # Where xpuserve's C++ kernels build, so does inductor's code. On a 2-core AVX2 EPYC, the
        # benchmark model: the first compile takes 49 s, 9 s with inductor's on-disk cache warm (another
        # model of the same shapes in the process: 0.1 s); median decode steps 7-25% faster at 1-64
        # sequences (docs/benchmarks.md, session 6).
        return gemm.available()

    def capture_decode(self, model: torch.nn.Module):
        # Each decoder layer compiled, not the whole model: the layers share one class, so inductor's
        # C++ for one serves all of them (a dense and a MoE layer times three batch classes: at most six
        # compiles whatever the depth). Everything but the custom operators (routed experts, paged
        # attention, cache writes, GEMMs) becomes inductor's code. Batch classes: 1 (a constant to the
        # compiler), up to GEMM_MAX_ROWS (xpuserve's GEMM), more.
        # A process holding several models (tests, A/B runs) compiles each one's regions: room for that.
        config = torch._dynamo.config
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
        return CompiledLayers(model, (1, GEMM_MAX_ROWS), COMPILE_OPTIONS)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.dtype == torch.bfloat16 and not self.native_bf16 and self._few_rows(x, weight):
            return gemm.bf16_linear(x, weight, bias)
        if torch.compiler.is_compiling():
            return F.linear(x, weight, bias)  # the compiler picks the GEMM
        upcast_rows = self.bf16_upcast_rows
        if x.dtype == torch.bfloat16 and upcast_rows is not None and x.numel() // x.shape[-1] >= upcast_rows:
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

    def _few_rows(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return x.numel() <= GEMM_MAX_ROWS * x.shape[-1] and weight.is_contiguous() and gemm.available()

    def int8_linear(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._few_rows(x, weight):
            return gemm.int8_linear(x, weight, scale, bias)
        if not int8pack_accepts(self.features.aten, x.dtype, x.shape[-1], weight):
            return super().int8_linear(x, weight, scale, bias)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if rows.data_ptr() % INT8PACK_INPUT_ALIGN[self.features.aten]:
            rows = rows.clone()  # a view into a larger buffer; a fresh tensor is 64-byte aligned
        y = torch._weight_int8pack_mm(rows, weight, scale.to(x.dtype)).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def fuses_experts(self, x: torch.Tensor, w13: torch.Tensor, int8_activations: bool) -> bool:
        # The experts' matmuls are the GEMM's (a few rows each), in one op instead of ~10 per busy expert.
        # W8A8 and FP8 experts keep the loop.
        kind_fits = w13.dtype == torch.int8 or (w13.dtype == torch.bfloat16 and not self.native_bf16)
        return kind_fits and not int8_activations and x.shape[0] <= GEMM_MAX_ROWS and gemm.available()

    def fused_experts(self, x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert: int) -> torch.Tensor:
        return gemm.fused_experts(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert)

    def head_linear(self, x: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        # Without native bf16, batched bf16 matmuls are slow at any size: xpuserve's GEMM widens the weight
        # in registers for a few tokens (no float32 copy of it per step), float32 bmm beyond.
        if weight.dtype == torch.bfloat16 and not self.native_bf16:
            if x.shape[0] <= GEMM_MAX_ROWS and weight.stride(-1) == 1 and gemm.available():
                return gemm.head_linear(x, weight, transposed)
            return super().head_linear(x.float(), weight.float(), transposed).to(x.dtype)
        return super().head_linear(x, weight, transposed)

    def attention_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype == torch.bfloat16 and not self.native_bf16 else dtype

    def memory_info(self, device: torch.device) -> None:
        return None  # host memory: the engine takes a fixed KV budget unless told otherwise
