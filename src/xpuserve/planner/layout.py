"""Parallel layouts of one serving unit and what each chip of it must hold in memory."""

from __future__ import annotations

from dataclasses import dataclass

from xpuserve.config import ModelConfig
from xpuserve.planner.chips import Chip
from xpuserve.planner.cost import BYTES, kv_bytes_per_token, param_counts, weight_bytes

GB = 1e9
MEMORY_UTILIZATION = 0.9  # the rest: runtime context, allocator fragmentation (vLLM's default)
TP_SIZES = (1, 2, 4, 8, 16)
EP_SIZES = (8, 16, 32, 64, 72, 128, 144, 256, 320)


@dataclass(frozen=True)
class Layout:
    """tp: tensor parallel over `tp` chips. ep: DP attention on each chip, routed experts over `ep` chips."""

    tp: int = 1
    ep: int = 1

    @property
    def chips(self) -> int:
        return max(self.tp, self.ep)

    def __str__(self) -> str:
        return f"EP{self.ep} DP-attn" if self.ep > 1 else f"TP{self.tp}"


def candidate_layouts(cfg: ModelConfig, chip: Chip) -> list[Layout]:
    layouts = [Layout(tp=t) for t in TP_SIZES if t <= chip.scaleup_chips]
    if cfg.n_routed_experts:
        layouts += [Layout(ep=e) for e in EP_SIZES]
    return layouts


@dataclass(frozen=True)
class Memory:
    weights: float  # bytes per chip
    activations: float
    usable: float  # HBM x MEMORY_UTILIZATION
    kv_per_token: float  # bytes per cached token on each chip that holds it

    @property
    def kv_room(self) -> float:
        return self.usable - self.weights - self.activations


def memory(cfg: ModelConfig, chip: Chip, layout: Layout, dtype: str, kv_dtype: str, chunk_tokens: int) -> Memory:
    total = weight_bytes(cfg, dtype)
    if layout.ep > 1:
        routed = param_counts(cfg)["routed_experts"] * BYTES[dtype]
        weights = total - routed + routed / layout.ep
        ffn = cfg.intermediate_size
    else:
        weights = total / layout.tp
        ffn = cfg.intermediate_size / layout.tp
    # Peak activations of a prefill chunk: residual, attention in/out and the widest FFN input.
    activations = chunk_tokens * (4 * cfg.hidden_size + 3 * ffn) * BYTES["bf16"]
    kv = kv_bytes_per_token(cfg, kv_dtype)
    if not cfg.is_mla and layout.ep == 1:  # GQA splits the KV heads; MLA's latent is whole on every TP chip
        kv /= min(layout.tp, cfg.num_key_value_heads)
    return Memory(weights, activations, chip.hbm_gb * GB * MEMORY_UTILIZATION, kv)


def why_not(cfg: ModelConfig, chip: Chip, layout: Layout, mem: Memory, dtype: str, seqs: int, seq_len: int) -> str:
    """Empty when the unit holds the weights and a KV cache for `seqs` sequences; else the reason."""
    if dtype == "fp8" and chip.fp8_tflops is None:
        return f"{chip.key} has no FP8 matmul (use --dtype int8 or bf16)"
    need_kv = mem.kv_per_token * seq_len * (seqs if layout.ep == 1 else -(-seqs // layout.chips))
    if mem.weights + mem.activations > mem.usable:
        return (f"weights {mem.weights / GB:.1f} GB/chip ({weight_bytes(cfg, dtype) / GB:.0f} GB {dtype} over "
                f"{layout.chips}) + activations {mem.activations / GB:.1f} GB > {mem.usable / GB:.1f} GB usable of "
                f"{chip.hbm_gb:g} GB")
    if mem.kv_room < need_kv:
        return (f"weights fit ({mem.weights / GB:.1f} GB/chip) but {mem.kv_room / GB:.2f} GB left for KV < "
                f"{need_kv / GB:.2f} GB for {seqs} sequences of {seq_len} tokens")
    return ""
