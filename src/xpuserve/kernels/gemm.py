"""Linear layers for a few rows (decode batches, MoE experts) over bfloat16 or INT8 weights, on CPU.

torch's bf16 F.linear on a CPU without AVX512-BF16 reads the weight once per row. The C++ op reads
each weight row once for all rows of x, widens it to float32 in registers and accumulates in float32:
bound by memory bandwidth at a few rows, by FMA throughput at many. Built on first use like the other
kernels (build.py); where it cannot be built, the float32 reference below computes the same thing.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from xpuserve.kernels import build

log = logging.getLogger(__name__)

NAME = "xpuserve_gemm"  # the library, and the namespace of its ops: torch.ops.xpuserve_gemm
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("gemm.cpp", "moe.cpp")]  # + gemm_tiles.h, which both include
OPS = ("bf16_linear", "int8_linear", "portable_linear")  # portable_linear: the non-SIMD tiles, for tests
X_DTYPES = (torch.bfloat16, torch.float32)

_status = "unavailable: not loaded yet"


# Dynamo runs this once while tracing and keeps the answer, so the op goes into the graph whole.
@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the C++ op is built and loaded on this machine (building it on the first call)."""
    return _load()


def status() -> str:
    """'C++ AVX2 (cached)', 'C++ portable (built in X s)' or 'unavailable: <why>'."""
    _load()
    return _status


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bfloat16 or float32) @ weight[N, K]^T (+ bias [N]), accumulated in float32; [..., N] in x's dtype.
    weight is bfloat16 and contiguous."""
    if _kernel_applies(x):
        return torch.ops.xpuserve_gemm.bf16_linear(x, weight, bias)
    return bf16_linear_reference(x, weight, bias)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ (weight[N, K] * scale[N, None])^T (+ bias), accumulated in float32; [..., N] in x's dtype.
    weight is int8 and contiguous, scale float32, one per output row."""
    if _kernel_applies(x):
        return torch.ops.xpuserve_gemm.int8_linear(x, weight, scale, bias)
    return int8_linear_reference(x, weight, scale, bias)


def head_linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Per head h: x[:, h] @ weight[h]^T (weight [H, M, K]), or x[:, h] @ weight[h] (weight [H, K, M]) when
    `transposed`; x [T, H, K] bfloat16 or float32, weight bfloat16 with contiguous rows. [T, H, M] in x's
    dtype, accumulated in float32."""
    if _kernel_applies(x):
        return torch.ops.xpuserve_gemm.head_linear(x, weight, transposed)
    return head_linear_reference(x, weight, transposed)


def head_linear_reference(x, weight, transposed=False):
    w = weight.float() if transposed else weight.float().transpose(1, 2)  # [H, K, M]
    return torch.bmm(x.float().transpose(0, 1), w).transpose(0, 1).to(x.dtype)


def fused_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor,
                  w13_scale: torch.Tensor | None, w2: torch.Tensor, w2_scale: torch.Tensor | None,
                  first_expert: int = 0) -> torch.Tensor:
    """A MoE layer's routed experts on x [M, K] (bfloat16 or float32) in one op: out[t] = sum over j of
    topk_weights[t, j] * expert e = topk_ids[t, j] on x[t], expert(x) = w2 (silu(gate x) * up x) with
    w13[e] = [gate; up] ([2I, K]) and w2[e] [K, I], bfloat16 or int8 with per-row scales. The layer's
    experts first_expert.. are the ones held here; pairs routed to others contribute nothing."""
    if _kernel_applies(x):
        return torch.ops.xpuserve_gemm.fused_experts(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert)
    return fused_experts_reference(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert)


def fused_experts_reference(x, topk_weights, topk_ids, w13, w13_scale, w2, w2_scale, first_expert=0):
    """What runs where the op is not built: each pair in float32, one at a time."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t, experts in enumerate(topk_ids.tolist()):
        for j, e in enumerate(e - first_expert for e in experts):
            if not 0 <= e < w13.shape[0]:
                continue
            a = w13[e].float() * (1 if w13_scale is None else w13_scale[e].float()[:, None])
            b = w2[e].float() * (1 if w2_scale is None else w2_scale[e].float()[:, None])
            gate, up = (a @ x[t].float()).chunk(2)
            out[t] += topk_weights[t, j].float() * (b @ (F.silu(gate) * up))
    return out.to(x.dtype)


def bf16_linear_reference(x, weight, bias=None):
    """The oracle: everything widened to float32 first."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def int8_linear_reference(x, weight, scale, bias=None):
    dequantized = weight.float() * scale.float()[:, None]
    return F.linear(x.float(), dequantized, None if bias is None else bias.float()).to(x.dtype)


def _kernel_applies(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype in X_DTYPES and available()  # is_cpu: a quarter of the cost of device.type


@functools.cache
def _load() -> bool:
    global _status
    try:
        how = build.build_library(NAME, SOURCES)
    except build.BuildError as e:
        _status = f"unavailable: {e}"
        log.warning("C++ GEMM unavailable, linear layers use the float32 reference: %s", e)
        return False
    for op in OPS:
        torch.library.register_fake(f"{NAME}::{op}")(_output_like)
    torch.library.register_fake(f"{NAME}::fused_experts")(lambda x, *args, **kwargs: torch.empty_like(x))
    torch.library.register_fake(f"{NAME}::head_linear")(
        lambda x, weight, transposed=False: x.new_empty(x.shape[0], x.shape[1], weight.shape[2 if transposed else 1]))
    _status = f"C++ {torch.ops.xpuserve_gemm.simd()} ({how})"
    return True


def _output_like(x, weight, *args, **kwargs):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
