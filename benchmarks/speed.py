"""The speed issue's table: xpuserve (bf16, INT8) against llama.cpp (bf16, Q8_0) on the benchmark model,
in one run, one engine at a time, the same workloads and thread count.

    python benchmarks/speed.py                  # every workload; writes docs/benchmarks.md
    python benchmarks/speed.py --workloads 1x128x128 8x2048x64 --no-report
    python benchmarks/speed.py --no-llama-cpp   # xpuserve only

xpuserve is timed through its engine (LLM.engine.step): prefill = prompt tokens / time of the steps
until every prompt is in the cache, decode = generated tokens / time of the remaining steps. That is
what llama-batched-bench reports for llama.cpp (benchmarks/llama_cpp_bench.py, which builds it from
the llama-cpp-python sdist). Prompts are random ids, greedy, EOS ignored; medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from llama_cpp_bench import WORKLOADS, Rate, llama_cpp_rates  # noqa: E402
from throughput import active_bytes_per_token, copy_bandwidth, write_section  # noqa: E402

from xpuserve import LLM, SamplingParams  # noqa: E402
from xpuserve.planner.bench_model import CONFIG, build_checkpoint  # noqa: E402
from xpuserve.platforms.cpu_features import detect as cpu_features  # noqa: E402

FORMATS = {"bf16": None, "int8": "int8"}  # xpuserve column -> --quantization


@dataclass
class Workload:
    requests: int
    prompt_len: int
    output_len: int

    def __str__(self) -> str:
        return f"{self.requests} x {self.prompt_len} / {self.output_len}"


def time_engine(llm: LLM, w: Workload, seed: int) -> Rate:
    engine = llm.engine
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True)
    for i in range(w.requests):
        ids = torch.randint(1, CONFIG["vocab_size"], (w.prompt_len,), generator=gen).tolist()
        engine.add_request(f"{seed}-{i}", ids, params)
    start = time.perf_counter()
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in list(engine.scheduler.waiting) + engine.scheduler.running):
        engine.step()
    prefilled = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    done = time.perf_counter()
    # The prompt-completing steps also sample each request's first token: decode counts the rest.
    return Rate(w.requests, w.prompt_len, w.output_len, w.requests * w.prompt_len / (prefilled - start),
                w.requests * (w.output_len - 1) / (done - prefilled), done - start)


def median_rate(runs: list[Rate]) -> Rate:
    first = runs[0]
    return Rate(first.requests, first.prompt_len, first.output_len,
                *(statistics.median(getattr(r, f) for r in runs) for f in ("prefill", "decode", "seconds")))


def xpuserve_rates(checkpoint: Path, workloads: list[Workload], repeats: int, eager: bool | None) -> dict[str, list[Rate]]:
    longest = max(w.prompt_len + w.output_len for w in workloads)
    result = {}
    for name, quantization in FORMATS.items():
        llm = LLM(str(checkpoint), device="cpu", dtype="bfloat16", quantization=quantization, max_model_len=longest,
                  max_num_seqs=max(w.requests for w in workloads), enforce_eager=eager)
        time_engine(llm, Workload(1, 128, 8), seed=0)  # first-time allocations out of the timed rows
        result[name] = []
        for w in workloads:
            rate = median_rate([time_engine(llm, w, seed=r + 1) for r in range(repeats)])
            result[name].append(rate)
            print(f"xpuserve {name:5s} {str(w):18s} prefill {rate.prefill:8.0f}  decode {rate.decode:7.1f} tok/s", flush=True)
        llm.engine.shutdown()
        del llm
    return result


def table(workloads, ours: dict[str, list[Rate]], theirs: dict[str, list[Rate]]) -> list[str]:
    columns = [f"xpuserve {k}" for k in ours] + [f"llama.cpp {k.upper()}" for k in theirs]
    rates = list(ours.values()) + list(theirs.values())
    lines = []
    for metric in ("decode", "prefill"):
        head = f"| {metric} tok/s | " + " | ".join(columns) + (" | xpuserve best / llama.cpp best |" if theirs else " |")
        lines += [head, "|---|" + "---:|" * (len(columns) + bool(theirs))]
        for i, w in enumerate(workloads):
            cells = [getattr(r[i], metric) for r in rates]
            row = f"| {w} | " + " | ".join(f"{c:,.1f}" for c in cells)
            if theirs:
                best_ours = max(getattr(r[i], metric) for r in ours.values())
                best_theirs = max(getattr(r[i], metric) for r in theirs.values())
                row += f" | {best_ours / best_theirs:.2f}x"
            lines.append(row + " |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=[f"{r}x{p}x{o}" for r, p, o in WORKLOADS],
                        help="requests x prompt x output, e.g. 8x2048x64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--no-report", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    workloads = [Workload(*map(int, spec.split("x"))) for spec in args.workloads]

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_checkpoint(Path(tmp))
        active, bandwidth = active_bytes_per_token(hf), copy_bandwidth()
        del hf
        print(f"machine: {cpu_features().describe()}, {torch.get_num_threads()} threads")
        print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {active / 1e6:.0f} MB of bf16 weights active per token "
              f"-> batch-1 decode roofline {bandwidth / active:.0f} tok/s bf16, {2 * bandwidth / active:.0f} INT8")
        ours = xpuserve_rates(Path(tmp), workloads, args.repeats, args.enforce_eager)
        theirs = {}
        if not args.no_llama_cpp:  # after xpuserve is done: one engine at a time
            triples = [(w.requests, w.prompt_len, w.output_len) for w in workloads]
            theirs = llama_cpp_rates(Path(tmp), triples, repeats=args.repeats, threads=torch.get_num_threads())
        lines = table(workloads, ours, theirs)
        print("\n".join(lines))
        if not args.no_report:
            mode = {None: "the platform's default", True: "eager", False: "captured"}[args.enforce_eager]
            write_section([
                "## Speed: xpuserve vs llama.cpp, the speed issue's workloads (CPU)",
                "",
                f"Machine: {cpu_features().describe()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
                f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`; decode step: {mode}; median of "
                f"{args.repeats} runs. Model: the benchmark model (bench_model.CONFIG, bf16 checkpoint; INT8 = "
                "`--quantization int8`, weight-only). Copy bandwidth "
                f"{bandwidth / 1e9:.1f} GB/s; batch-1 decode roofline {bandwidth / active:.0f} tok/s bf16.",
                "",
                *lines,
            ])


if __name__ == "__main__":
    main()
