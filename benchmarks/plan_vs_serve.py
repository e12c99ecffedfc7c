"""The planner's answer against the served reality, on this machine, in one run.

    python benchmarks/plan_vs_serve.py            # writes its section of docs/benchmarks.md

`xpuserve calibrate` measures this CPU; the planner then predicts, for the ~200M benchmark model,
the time per output token at a batch of 1 and 8 and the time to first token of one prompt. The
same model is then served (`xpuserve serve`, bf16) and measured over HTTP with `xpuserve bench` at
those concurrencies. This is the check behind "know the price per million tokens before you buy":
the planner's cost comes from exactly these times.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from server_fixture import free_port  # noqa: E402
from throughput import write_section  # noqa: E402
from xpuserve.bench.report import summary_of  # noqa: E402
from xpuserve.bench.run import BenchConfig, run_benchmark  # noqa: E402
from xpuserve.config import ModelConfig  # noqa: E402
from xpuserve.planner.bench_model import build_checkpoint  # noqa: E402
from xpuserve.planner.calibrate import calibrate  # noqa: E402
from xpuserve.planner.layout import Layout  # noqa: E402
from xpuserve.planner.plan import Options, Workload, decode_step, prefill_step  # noqa: E402

INPUT_LEN, OUTPUT_LEN = 128, 64


def predicted(cfg: ModelConfig, chip, batch: int) -> tuple[float, float]:
    """(TPOT at `batch`, TTFT of one prompt alone), in ms."""
    work = Workload(INPUT_LEN, OUTPUT_LEN)
    tpot = decode_step(cfg, chip, Layout(), Options(), batch, INPUT_LEN + OUTPUT_LEN / 2).total
    ttft = prefill_step(cfg, chip, Layout(), Options(), 1, work).total
    return tpot * 1e3, ttft * 1e3


def served(model: Path, concurrency: list[int], prompts: int) -> dict[int, object]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "xpuserve", "serve", str(model), "--device", "cpu", "--dtype", "bfloat16",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        warm = BenchConfig(base_url=url, num_prompts=2, random_input_len=INPUT_LEN, random_output_len=8, ignore_eos=True, seed=99)
        run_benchmark(warm)  # first touches of weights and cache pages
        return {c: summary_of(run_benchmark(BenchConfig(base_url=url, num_prompts=prompts, random_input_len=INPUT_LEN,
                                                        random_output_len=OUTPUT_LEN, ignore_eos=True, max_concurrency=c,
                                                        seed=c, tokenizer=str(model))))
                for c in concurrency}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    result = calibrate()
    chip = result.chip
    print(f"calibrated: {chip.name}; engine decode {result.measured}, planner {result.predicted} tok/s")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "bench"
        build_checkpoint(model)
        cfg = ModelConfig.from_pretrained(model)
        measured = served(model, args.concurrency, args.num_prompts)
    rows = []
    for c in args.concurrency:
        tpot, ttft = predicted(cfg, chip, c)
        s = measured[c]
        rows.append((c, tpot, s.tpot.median, ttft, s.ttft.median, s.output_throughput))
        print(f"concurrency {c}: TPOT planner {tpot:.1f} ms, served median {s.tpot.median:.1f} ms ({s.tpot.median / tpot:.2f}x); "
              f"TTFT planner {ttft:.0f} ms (one prompt alone), served median {s.ttft.median:.0f} ms; "
              f"served {s.output_throughput:.1f} output tok/s")
    if not args.no_report:
        write_section([
            "## The planner against the served model (CPU)",
            "",
            f"Machine: {chip.name}. Command: `python benchmarks/plan_vs_serve.py` (calibrates, then serves the ~200M benchmark",
            f"model in bf16 and drives it with `xpuserve bench`: {args.num_prompts} prompts of {INPUT_LEN} tokens, {OUTPUT_LEN} output tokens each).",
            "",
            "| concurrency | TPOT planner ms | TPOT served, median ms | served / planner | TTFT planner ms (one prompt alone) | TTFT served, median ms | served output tok/s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *[f"| {c} | {tp:.1f} | {ts:.1f} | {ts / tp:.2f}x | {fp:.0f} | {fs:.0f} | {tps:.1f} |" for c, tp, ts, fp, fs, tps in rows],
            "",
            "Calibration in the same run, offline engine decode against the planner: "
            + ", ".join(f"batch {b} {result.measured[b]:.1f} vs {result.predicted[b]:.1f} tok/s" for b in result.measured) + ".",
            "At concurrency 1 nothing shares a step, so the gap is the planner's own error against the engine plus",
            "what serving adds per token (HTTP, streaming, the engine thread). At higher concurrency other requests'",
            "prefills share steps with the decodes (continuous batching) and the first requests of a run wait for",
            "each other's prompts, which the planner's decode step and one-prompt TTFT leave out.",
            "",
        ])


if __name__ == "__main__":
    main()
