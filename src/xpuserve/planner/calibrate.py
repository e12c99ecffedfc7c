"""`xpuserve calibrate`: measure this machine's rates with the engine's own kernels, measure the
engine's decode on the benchmark model, and write a chip profile the planner reads.

Rates are taken the way the engine meets them: bf16 weights through the platform's `linear`
(one row: weight streaming; a few rows: the bf16 GEMM, emulated on CPUs without bf16; many
rows: float32). The engine's fixed per-step cost comes from a model of the same structure with
negligible weights. Rates and engine runs are taken in one process, close in time.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from xpuserve.config import ModelConfig
from xpuserve.planner.bench_model import CONFIG, TINY_CONFIG, build_checkpoint
from xpuserve.planner.chips import Chip
from xpuserve.planner.layout import Layout
from xpuserve.planner.plan import Options, decode_step

PROMPT_LEN = 16


@dataclass
class Rates:
    stream_gbps: float  # bf16 weight bytes read per second by a one-row matmul
    bf16_tflops: float  # bf16 matmul below the float32 switch (rows < BF16_UPCAST_ROWS)
    fp32_tflops: float
    upcast_rows: int | None


@dataclass
class Calibration:
    chip: Chip
    measured: dict[int, float]  # batch -> engine decode tokens/s
    predicted: dict[int, float]


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rates(repeats: int = 5) -> Rates:
    import torch

    from xpuserve.platforms import current_platform

    from xpuserve.platforms import cpu as cpu_platform

    platform = current_platform()
    upcast = getattr(platform, "native_bf16", True) is False
    rows_switch = getattr(cpu_platform, "BF16_UPCAST_ROWS", None) if upcast else None
    # 2816x1024 matrices, 256 MB in bf16: far more than the caches, as a model's weights are.
    weights = [torch.empty(2816, 1024, dtype=torch.bfloat16).uniform_(-0.05, 0.05) for _ in range(44)]
    params = sum(w.numel() for w in weights)

    def run(rows: int, ws):
        x = torch.randn(rows, 1024).to(ws[0].dtype)
        return lambda: [platform.linear(x, w) for w in ws]

    with torch.inference_mode():
        stream = 2 * params / _median_time(run(1, weights), repeats)
        small = 8 if upcast else 64  # rows the bf16 kernel itself runs
        bf16 = 2 * small * params / _median_time(run(small, weights), repeats)
        weights32 = [w.float() for w in weights[:8]]  # float32 GEMMs are compute-bound: cache-sized is fine
        fp32 = 2 * 64 * sum(w.numel() for w in weights32) / _median_time(run(64, weights32), repeats)
    return Rates(stream / 1e9, bf16 / 1e12, fp32 / 1e12, rows_switch)


def engine_decode_step(llm, batch: int, steps: int) -> float:
    """Median seconds of one engine decode step with `batch` sequences (prefill excluded)."""
    from xpuserve.sampling_params import SamplingParams

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


def cpu_chip(rates: Rates, layer_us: float, expert_us: float, name: str, memory_gb: float) -> Chip:
    return Chip(
        key="cpu", name=name, bf16_tflops=rates.bf16_tflops, fp32_tflops=rates.fp32_tflops,
        bf16_upcast_rows=rates.upcast_rows, hbm_gb=memory_gb, hbm_gbps=rates.stream_gbps, link_gbps=10,
        network_gbps=1, scaleup_chips=1, price_per_hour=0.1, compute_efficiency=1.0, memory_efficiency=1.0,
        layer_overhead_us=layer_us, expert_overhead_us=expert_us,
        source=f"xpuserve calibrate on {name}, {time.strftime('%Y-%m-%d')}",
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
    from xpuserve.planner.cost import busy_experts

    return busy_experts(cfg.n_routed_experts, cfg.num_experts_per_tok, batch)


def predicted_decode_tps(cfg: ModelConfig, chip: Chip, batch: int, context: float) -> float:
    return batch / decode_step(cfg, chip, Layout(), Options(), batch, context).total


def calibrate(batches: tuple[int, ...] = (1, 16), steps: int = 8, rounds: int = 2, workdir: str | None = None) -> Calibration:
    import torch

    from xpuserve import LLM
    from xpuserve.planner.chips import load_chips

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
            samples.setdefault("rates", []).append(measure_rates(repeats=3))
            for b in (1, 16):
                samples.setdefault(f"tiny{b}", []).append(engine_decode_step(tiny_llm, b, steps))
            for b in batches:
                samples.setdefault(f"big{b}", []).append(engine_decode_step(llm, b, steps))
        runs = samples["rates"]
        rates = Rates(*(statistics.median(getattr(r, f) for r in runs) for f in ("stream_gbps", "bf16_tflops", "fp32_tflops")),
                      runs[0].upcast_rows)
        layer_us, expert_us = fixed_costs(tiny_cfg, rates, {b: statistics.median(samples[f"tiny{b}"]) for b in (1, 16)})
        measured = {b: b / statistics.median(samples[f"big{b}"]) for b in batches}
    name = f"{_cpu_name()}, {torch.get_num_threads()} threads"
    shipped = load_chips().get("cpu")
    chip = cpu_chip(rates, layer_us, expert_us, name, shipped.hbm_gb if shipped else 16)
    context = PROMPT_LEN + steps / 2
    predicted = {b: predicted_decode_tps(cfg, chip, b, context) for b in batches}
    return Calibration(chip, measured, predicted)


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
