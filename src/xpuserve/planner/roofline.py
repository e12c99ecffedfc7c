"""Time of a step on a chip: each matmul at the slower of its compute and its weight reads,
attention likewise, communication from the fabric bandwidth, plus fixed per-step overheads."""

from __future__ import annotations

from dataclasses import dataclass

from xpuserve.planner.chips import Chip
from xpuserve.planner.cost import BYTES, Matmul, Step


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the chip's peaks a serving stack reaches (defaults come from the chip profile)."""

    compute: float
    memory: float
    comm: float

    @classmethod
    def of(cls, chip: Chip, compute: float | None = None, memory: float | None = None, comm: float | None = None):
        return cls(compute or chip.compute_efficiency, memory or chip.memory_efficiency, comm or chip.comm_efficiency)


@dataclass(frozen=True)
class StepTime:
    matmul: float
    attention: float
    comm: float
    overhead: float
    overlap: bool

    @property
    def total(self) -> float:
        compute = self.matmul + self.attention
        return (max(compute, self.comm) if self.overlap else compute + self.comm) + self.overhead


def matmul_time(m: Matmul, chip: Chip, dtype: str, eff: Efficiency) -> float:
    dtype = m.dtype or dtype
    bandwidth = chip.hbm_gbps * 1e9 * eff.memory
    if dtype == "fp32":
        rate = chip.fp32_tflops or chip.bf16_tflops
    elif dtype == "bf16" and chip.bf16_upcast_rows is not None and (m.rows >= chip.bf16_upcast_rows or m.batched):
        return upcast_time(m, chip, eff)  # the CPU platform's batched matmul upcasts at any row count
    else:
        rate = chip.matmul_tflops(dtype)
    return max(m.flops / (rate * 1e12 * eff.compute), m.params * BYTES[dtype] / bandwidth)


# glibc's malloc maps blocks above 32 MiB (its largest mmap threshold) afresh on every allocation
# and unmaps them when freed, so their pages are faulted in (and zeroed) on every call.
MALLOC_REUSE_BYTES = 32 * 2**20


def upcast_time(m: Matmul, chip: Chip, eff: Efficiency) -> float:
    """The CPU platform's bf16 matmul of many rows: convert each weight to float32, multiply in float32."""
    # Uncalibrated profiles: the conversion reads 2 bytes and writes 4 per weight at the memory bandwidth.
    convert_ns = chip.upcast_ns_per_param or 6 / (chip.hbm_gbps * eff.memory)
    t = m.params * convert_ns * 1e-9 + m.flops / (chip.fp32_tflops * 1e12 * eff.compute)
    if chip.fresh_page_gbps and 4 * m.k * m.n > MALLOC_REUSE_BYTES:
        t += 4 * m.params / (chip.fresh_page_gbps * 1e9)
    return t


def attention_time(step: Step, chip: Chip, eff: Efficiency) -> float:
    # Attention runs in bf16 (float32 on CPUs that upcast bf16).
    rate = chip.fp32_tflops if chip.bf16_upcast_rows is not None else chip.bf16_tflops
    return max(step.attn_flops / (rate * 1e12 * eff.compute), step.kv_bytes / (chip.hbm_gbps * 1e9 * eff.memory))


def comm_time(
    hidden: int, tokens: float, layers: int, moe_layers: int, top_k: int, tp: int, ep: int,
    chip: Chip, eff: Efficiency, dispatch_dtype: str = "bf16", node_limit: int | None = None,
) -> float:
    """Tensor-parallel all-reduces (two per layer) and expert-parallel dispatch + combine (per MoE layer)."""
    def bandwidth(group: int) -> float:
        gbps = chip.link_gbps if group <= chip.scaleup_chips else chip.network_gbps
        return gbps * 1e9 * eff.comm

    latency = chip.collective_latency_us * 1e-6
    t = 0.0
    if tp > 1:  # ring all-reduce moves 2 (tp-1)/tp of the activations
        volume = tokens * hidden * BYTES["bf16"] * 2 * (tp - 1) / tp
        t += 2 * layers * (volume / bandwidth(tp) + latency)
    if ep > 1:  # each token goes to top_k experts, (ep-1)/ep of them on other chips, and comes back in bf16
        copies = top_k
        if ep > chip.scaleup_chips and node_limit:  # node-limited routing: one copy per node, forwarded inside it
            copies = min(top_k, node_limit)
        remote = tokens * copies * hidden * (ep - 1) / ep
        volume = remote * (BYTES[dispatch_dtype] + BYTES["bf16"])
        t += moe_layers * (volume / bandwidth(ep) + 2 * latency)
    return t


def step_time(
    step: Step, chip: Chip, dtype: str, eff: Efficiency, comm: float, layers: int, moe_layers: int,
    overlap: bool = False,
) -> StepTime:
    matmul = sum(matmul_time(m, chip, dtype, eff) for m in step.matmuls)
    overhead = (layers * chip.layer_overhead_us + moe_layers * step.busy_experts * chip.expert_overhead_us) * 1e-6
    return StepTime(matmul, attention_time(step, chip, eff), comm, overhead, overlap)
