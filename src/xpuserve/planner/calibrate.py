"""`xpuserve calibrate`: measure this machine's rates with the engine's own kernels, measure the
engine's decode on the benchmark model, and write a chip profile the planner reads.

Rates are taken the way the engine meets them: bf16 weights through the platform's own `linear`,
whichever kernel it chose for this CPU (one row: weight streaming; a few rows: the bf16 GEMM, oneDNN's
where the CPU has AVX-512 or AMX, emulated row by row where not; 16 and 64 rows on CPUs without it: the weight's conversion to float32 plus the float32 GEMM, and the page faults
of float32 copies too large for malloc to reuse). The engine's fixed per-step cost comes from a
model of the same structure with negligible weights. Rates and engine runs are taken in one
process, interleaved; nothing is fitted to the benchmark model's own engine timings.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from xpuserve.config import ModelConfig
from xpuserve.llm import LLM
from xpuserve.planner.bench_model import CONFIG, TINY_CONFIG, build_checkpoint
from xpuserve.planner.chips import Chip, load_chips
from xpuserve.planner.cost import busy_experts
from xpuserve.planner.layout import Layout
from xpuserve.planner.plan import Options, decode_step
from xpuserve.platforms import current_platform
from xpuserve.platforms.cpu import CpuPlatform
from xpuserve.platforms.cpu_features import detect
from xpuserve.sampling_params import SamplingParams

PROMPT_LEN = 16


@dataclass
class Rates:
    stream_gbps: float  # bf16 weight bytes read per second by a one-row matmul
    bf16_tflops: float  # the bf16 kernel at a few rows (emulated on CPUs without native bf16)
    fp32_tflops: float
    upcast_rows: int | None = None  # CPUs without native bf16: rows from which the platform upcasts
    upcast_ns_per_param: float | None = None  # converting one bf16 weight to float32 on that path
    fresh_page_gbps: float | None = None  # float32 copies above malloc's reuse limit: pages faulted in


@dataclass
class Calibration:
    chip: Chip
    measured: dict[int, float]  # batch -> engine decode tokens/s
    predicted: dict[int, float]
    model: ModelConfig  # the benchmark model both are for


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rates(repeats: int = 3) -> Rates:
    """The platform's `linear` timed on bf16 weights far larger than the caches, as a model's are."""
    platform = current_platform()
    if not isinstance(platform, CpuPlatform):
        raise ValueError(f"calibrate measures CPUs; the model was loaded on {platform.name}")

    def weights(*shapes: tuple[int, int, int]) -> list:
        return [torch.empty(n, k, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
                for n, k, count in shapes for _ in range(count)]

    def s_per_param(rows: int, ws: list) -> float:
        xs = {k: torch.randn(rows, k).to(ws[0].dtype) for k in {w.shape[1] for w in ws}}
        seconds = _median_time(lambda: [platform.linear(xs[w.shape[1]], w) for w in ws], repeats)
        return seconds / sum(w.numel() for w in ws)

    # 218 MB of bf16 weights in three shapes, each float32 copy small enough for malloc to reuse.
    mixed = weights((1024, 1024, 16), (2816, 1024, 16), (1024, 2816, 16))
    with torch.inference_mode():
        stream = 2 / s_per_param(1, mixed)  # bf16 bytes per second
        if platform.bf16_upcast_rows is None:
            bf16 = 2 * 64 / s_per_param(64, mixed)
            fp32 = 2 * 64 / s_per_param(64, [w.float() for w in mixed[:8]])  # compute-bound: cache-sized is fine
            return Rates(stream / 1e9, bf16 / 1e12, fp32 / 1e12)
        rows = platform.bf16_upcast_rows
        # Below `rows` the emulated bf16 kernel: its time grows with the rows (it is compute-bound),
        # timed at 4 rows, what a routed expert gets in a decode batch.
        bf16 = 2 * 4 / s_per_param(4, mixed)
        # From `rows` on: time per weight = conversion + 2 x rows / float32 rate; two row counts give both.
        few, many = s_per_param(16, mixed), s_per_param(64, mixed)
        per_row = (many - few) / (64 - 16)
        convert = few - 16 * per_row
        # Weights whose float32 copy (64 MiB) exceeds what malloc reuses: the extra time is page faults.
        large = weights((16384, 1024, 4))
        fresh = 4 / max(s_per_param(16, large) - few, 1e-12)
    return Rates(stream / 1e9, bf16 / 1e12, 2 / per_row / 1e12, rows, convert * 1e9, fresh / 1e9)


def _median_rates(runs: list[Rates]) -> Rates:
    values = {f.name: [getattr(r, f.name) for r in runs] for f in fields(Rates)}
    return Rates(**{k: v[0] if v[0] is None or k == "upcast_rows" else statistics.median(v) for k, v in values.items()})


def engine_decode_step(llm, batch: int, steps: int) -> float:
    """Median seconds of one engine decode step with `batch` sequences (prefill excluded)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"calibrate-{batch}-{i}-{time.monotonic_ns()}", [1 + i] * PROMPT_LEN, params)
    engine.step()  # prefill
    engine.step()
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[:steps])


def cpu_chip(rates: Rates, layer_us: float, expert_us: float, name: str, memory_gb: float, kernel: str = "") -> Chip:
    return Chip(
        key="cpu", name=name, bf16_tflops=rates.bf16_tflops, fp32_tflops=rates.fp32_tflops,
        bf16_upcast_rows=rates.upcast_rows, upcast_ns_per_param=rates.upcast_ns_per_param,
        fresh_page_gbps=rates.fresh_page_gbps, hbm_gb=memory_gb, hbm_gbps=rates.stream_gbps, link_gbps=10,
        network_gbps=1, scaleup_chips=1, price_per_hour=0.1, compute_efficiency=1.0, memory_efficiency=1.0,
        layer_overhead_us=layer_us, expert_overhead_us=expert_us,
        source=f"xpuserve calibrate on {name}, {time.strftime('%Y-%m-%d')}" + (f"; bf16 matmul: {kernel}" if kernel else ""),
    )


def fixed_costs(tiny_cfg: ModelConfig, rates: Rates, tiny_steps: dict[int, float]) -> tuple[float, float]:
    """(per-layer, per-busy-expert) microseconds from the tiny model's decode steps at batch 1 and 16."""
    bare = cpu_chip(rates, 0.0, 0.0, "", 1.0)
    layers = tiny_cfg.num_hidden_layers
    moe_layers = sum(tiny_cfg.is_moe_layer(i) for i in range(layers))
    points = []
    for batch, measured in sorted(tiny_steps.items()):
        step = decode_step(tiny_cfg, bare, Layout(), Options(), batch, PROMPT_LEN)
        points.append((max(measured - step.total, 0.0), step_busy(tiny_cfg, batch)))
    (t1, e1), (t16, e16) = points
    expert = max((t16 - t1) / (moe_layers * (e16 - e1)), 0.0)
    layer = max((t1 - moe_layers * e1 * expert) / layers, 0.0)
    return layer * 1e6, expert * 1e6


def step_busy(cfg: ModelConfig, batch: int) -> float:
    return busy_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)


def predicted_decode_tps(cfg: ModelConfig, chip: Chip, batch: int, context: float) -> float:
    return batch / decode_step(cfg, chip, Layout(), Options(), batch, context).total


def calibrate(batches: tuple[int, ...] = (1, 16), steps: int = 8, rounds: int = 3, workdir: str | None = None) -> Calibration:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        big, tiny = Path(tmp) / "bench", Path(tmp) / "tiny"
        build_checkpoint(big, CONFIG)
        build_checkpoint(tiny, TINY_CONFIG)
        cfg, tiny_cfg = ModelConfig.from_pretrained(big), ModelConfig.from_pretrained(tiny)
        llm = LLM(str(big), dtype="bfloat16", device="cpu")
        tiny_llm = LLM(str(tiny), dtype="bfloat16", device="cpu")
        for warm in (llm, tiny_llm):  # first touches of the weights and the cache pages are slow
            engine_decode_step(warm, 16, 2)
        # Rounds of (rates, tiny model, benchmark model) so that a busy machine disturbs all alike;
        # the median of each quantity over the rounds is kept.
        samples: dict[str, list] = {}
        for _ in range(rounds):
            samples.setdefault("rates", []).append(measure_rates())
            for b in (1, 16):
                samples.setdefault(f"tiny{b}", []).append(engine_decode_step(tiny_llm, b, steps))
            for b in batches:
                samples.setdefault(f"big{b}", []).append(engine_decode_step(llm, b, steps))
        rates = _median_rates(samples["rates"])
        layer_us, expert_us = fixed_costs(tiny_cfg, rates, {b: statistics.median(samples[f"tiny{b}"]) for b in (1, 16)})
        measured = {b: b / statistics.median(samples[f"big{b}"]) for b in batches}
    name = f"{detect().describe()}, {torch.get_num_threads()} threads"
    shipped = load_chips().get("cpu")
    kernel = current_platform().kernels()["bf16 matmul"]
    chip = cpu_chip(rates, layer_us, expert_us, name, shipped.hbm_gb if shipped else 16, kernel)
    context = PROMPT_LEN + steps / 2
    predicted = {b: predicted_decode_tps(cfg, chip, b, context) for b in batches}
    return Calibration(chip, measured, predicted, cfg)


def profile_toml(chip: Chip) -> str:
    """The chip as a `chips.toml` table."""
    lines = [f"[{chip.key}]"]
    for key, value in vars(replace(chip)).items():
        if key == "key" or value is None:
            continue
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, float):
            lines.append(f"{key} = {value:.6g}")
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"
