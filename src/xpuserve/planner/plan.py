"""The planner: for each chip and layout, whether the model fits, the batch under the latency
target, throughput per chip, chips needed for the workload, and cost per million tokens."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from xpuserve.config import ModelConfig
from xpuserve.planner.chips import Chip
from xpuserve.planner.cost import step_cost, usd_per_million
from xpuserve.planner.layout import GB, Layout, candidate_layouts, memory, why_not
from xpuserve.planner.roofline import Efficiency, StepTime, comm_time, step_time


@dataclass
class Workload:
    input_len: int = 2000
    output_len: int = 500
    prefix_hit: float = 0.0  # fraction of input tokens found in the prefix cache
    arrival_rate: float | None = None  # requests per second
    concurrency: int | None = None  # requests decoding at once


@dataclass
class Options:
    dtype: str = "bf16"  # weights (and matmul inputs where the chip has that matmul)
    kv_dtype: str = "bf16"
    ttft_s: float = 2.0
    tpot_s: float = 0.05
    imbalance: float = 1.0  # hottest chip's expert load over the mean (EP only)
    overlap: bool = False  # communication hidden behind compute (two micro-batches)
    min_seqs: int = 16  # a "useful" KV cache holds this many full-length sequences per unit
    chunk_tokens: int = 8192  # prefill tokens per step (max_num_batched_tokens)
    chips: int | None = None  # a fixed deployment size
    compute_eff: float | None = None
    memory_eff: float | None = None
    comm_eff: float | None = None
    prices: dict[str, float] = field(default_factory=dict)


@dataclass
class PlanRow:
    chip: str
    layout: str
    dtype: str
    kv_dtype: str
    fits: bool
    reason: str
    unit_chips: int
    chips_needed: int
    weights_gb_per_chip: float
    kv_room_gb_per_chip: float
    max_batch: int  # sequences decoding at once per unit, under the TPOT target
    prefill_tps_per_chip: float  # input tokens/s, prefix-cache hits included
    decode_tps_per_chip: float
    ttft_ms: float
    tpot_ms: float
    usd_per_m_input: float
    usd_per_m_output: float
    meets_target: bool
    price_per_hour: float

    def to_dict(self) -> dict:
        return asdict(self)


def decode_step(cfg: ModelConfig, chip: Chip, layout: Layout, opts: Options, batch: float, context: float) -> StepTime:
    """One decode step of a unit with `batch` sequences per chip (ep) or per unit (tp)."""
    eff = Efficiency.of(chip, opts.compute_eff, opts.memory_eff, opts.comm_eff)
    step = step_cost(cfg, batch, batch, context, True, layout.tp, layout.ep, opts.imbalance, opts.kv_dtype)
    return step_time(step, chip, opts.dtype, eff, _comm(cfg, chip, layout, opts, batch, eff), *_layers(cfg), opts.overlap)


def prefill_step(cfg: ModelConfig, chip: Chip, layout: Layout, opts: Options, prompts: float, work: Workload) -> StepTime:
    eff = Efficiency.of(chip, opts.compute_eff, opts.memory_eff, opts.comm_eff)
    new = work.input_len * (1 - work.prefix_hit)
    tokens = prompts * new
    step = step_cost(cfg, tokens, prompts, work.input_len * work.prefix_hit, False, layout.tp, layout.ep,
                     opts.imbalance, opts.kv_dtype)
    return step_time(step, chip, opts.dtype, eff, _comm(cfg, chip, layout, opts, tokens, eff), *_layers(cfg), opts.overlap)


def _layers(cfg: ModelConfig) -> tuple[int, int]:
    return cfg.num_hidden_layers, sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))


def _comm(cfg: ModelConfig, chip: Chip, layout: Layout, opts: Options, tokens: float, eff: Efficiency) -> float:
    layers, moe_layers = _layers(cfg)
    dispatch = "fp8" if opts.dtype == "fp8" else "bf16"
    # V3 chooses experts within topk_group groups; DeepSeek places groups so a token reaches at most that many nodes.
    node_limit = cfg.topk_group if cfg.n_group > 1 else None
    return comm_time(cfg.hidden_size, tokens, layers, moe_layers, cfg.num_experts_per_tok, layout.tp, layout.ep,
                     chip, eff, dispatch, node_limit)


def max_batch(cfg: ModelConfig, chip: Chip, layout: Layout, opts: Options, context: float, limit: int) -> int:
    """Largest batch (per chip for ep, per unit for tp) whose decode step meets the TPOT target; 0 if none."""
    lo, hi = 0, max(limit, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if decode_step(cfg, chip, layout, opts, mid, context).total <= opts.tpot_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_layout(cfg: ModelConfig, chip: Chip, layout: Layout, work: Workload, opts: Options) -> PlanRow:
    price = opts.prices.get(chip.key, chip.price_per_hour)
    seq_len = work.input_len + work.output_len
    mem = memory(cfg, chip, layout, opts.dtype, opts.kv_dtype, opts.chunk_tokens)
    reason = why_not(cfg, chip, layout, mem, opts.dtype, opts.min_seqs, seq_len)
    row = PlanRow(chip.key, str(layout), opts.dtype, opts.kv_dtype, not reason, reason, layout.chips, 0,
                  mem.weights / GB, mem.kv_room / GB, 0, 0.0, 0.0, 0.0, 0.0, math.inf, math.inf, False, price)
    if reason:
        return row
    context = work.input_len + work.output_len / 2
    by_memory = int(mem.kv_room // (mem.kv_per_token * seq_len))  # per chip (ep) or per unit (tp)
    batch = max_batch(cfg, chip, layout, opts, context, by_memory)
    if batch == 0:  # not even one sequence meets TPOT: report batch 1 and say so
        batch = 1
        row.reason = "TPOT target not met even at batch 1"
    tpot = decode_step(cfg, chip, layout, opts, batch, context).total
    per_unit = batch * (layout.ep if layout.ep > 1 else 1)
    row.max_batch = per_unit
    row.tpot_ms = tpot * 1e3
    row.decode_tps_per_chip = per_unit / tpot / layout.chips

    new = max(work.input_len * (1 - work.prefix_hit), 1.0)
    prompts = max(1, opts.chunk_tokens // int(new))
    t = prefill_step(cfg, chip, layout, opts, prompts, work).total
    while prompts > 1 and t > opts.ttft_s:
        prompts = max(1, prompts // 2)
        t = prefill_step(cfg, chip, layout, opts, prompts, work).total
    row.ttft_ms = t * 1e3
    chips_per_step = layout.tp if layout.ep == 1 else 1
    row.prefill_tps_per_chip = prompts * work.input_len / t / chips_per_step
    row.usd_per_m_input = usd_per_million(price, row.prefill_tps_per_chip)
    row.usd_per_m_output = usd_per_million(price, row.decode_tps_per_chip)
    row.meets_target = not row.reason and t <= opts.ttft_s
    if t > opts.ttft_s and not row.reason:
        row.reason = f"TTFT {t * 1e3:.0f} ms over the target even for one prompt"
    row.chips_needed = chips_needed(row, layout, work, opts)
    return row


def chips_needed(row: PlanRow, layout: Layout, work: Workload, opts: Options) -> int:
    unit = layout.chips
    if opts.chips is not None:
        return opts.chips
    units = 1.0
    if work.concurrency:
        units = max(units, work.concurrency / row.max_batch)
    if work.arrival_rate:
        prefill_chips = work.arrival_rate * work.input_len / row.prefill_tps_per_chip
        decode_chips = work.arrival_rate * work.output_len / row.decode_tps_per_chip
        units = max(units, (prefill_chips + decode_chips) / unit)
    return math.ceil(units - 1e-9) * unit


def plan(cfg: ModelConfig, chips: list[Chip], work: Workload, opts: Options) -> list[PlanRow]:
    rows = []
    for chip in chips:
        for layout in candidate_layouts(cfg, chip):
            if opts.chips is not None and opts.chips % layout.chips:
                continue
            rows.append(plan_layout(cfg, chip, layout, work, opts))
    return rows


def smallest_fit(rows: list[PlanRow], chip: str) -> PlanRow | None:
    fitting = [r for r in rows if r.chip == chip and r.fits]
    return min(fitting, key=lambda r: (r.unit_chips, r.usd_per_m_output), default=None)


def cheapest(rows: list[PlanRow], chip: str, work: Workload) -> PlanRow | None:
    """The layout with the lowest cost per request of the workload, among those meeting the target."""
    good = [r for r in rows if r.chip == chip and r.meets_target] or [r for r in rows if r.chip == chip and r.fits]
    return min(good, key=lambda r: r.usd_per_m_input * work.input_len + r.usd_per_m_output * work.output_len, default=None)
