"""A run's result as an aligned table (the layout of vLLM's `bench serve`) or as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from xpuserve.bench.run import BenchResult
from xpuserve.bench.summary import Summary, summarize

WIDTH = 50


def summary_of(result: BenchResult) -> Summary:
    return summarize(result.requests, result.duration, result.config.price_per_hour)


def table(result: BenchResult) -> str:
    s = summary_of(result)
    rows = [
        _title(" Serving Benchmark Result ", "="),
        _row("Successful requests:", s.completed),
        _row("Failed requests:", s.failed),
        _row("Benchmark duration (s):", f"{s.duration:.2f}"),
        _row("Total input tokens:", s.input_tokens),
        _row("Total generated tokens:", s.output_tokens),
        _row("Request throughput (req/s):", f"{s.request_throughput:.2f}"),
        _row("Input token throughput (tok/s):", f"{s.input_throughput:.2f}"),
        _row("Output token throughput (tok/s):", f"{s.output_throughput:.2f}"),
    ]
    if result.config.price_per_hour is not None:
        rows += [_title(f"Cost at ${result.config.price_per_hour:g}/hour", "-"),
                 _row("USD per 1M input tokens:", _usd(s.usd_per_m_input)),
                 _row("USD per 1M output tokens:", _usd(s.usd_per_m_output))]
    for name, title, stats in (("TTFT", "Time to First Token", s.ttft),
                               ("TPOT", "Time per Output Token (excl. 1st token)", s.tpot),
                               ("ITL", "Inter-token Latency", s.itl), ("E2EL", "End-to-end Latency", s.e2e)):
        rows += [_title(title, "-"), _row(f"Mean {name} (ms):", f"{stats.mean:.2f}"),
                 _row(f"Median {name} (ms):", f"{stats.median:.2f}"), _row(f"P99 {name} (ms):", f"{stats.p99:.2f}")]
    rows.append("=" * WIDTH)
    if s.first_error is not None:
        rows.append(f"First error: {s.first_error}")
    return "\n".join(rows)


def _title(text: str, fill: str) -> str:
    return text.center(WIDTH, fill)


def _row(label: str, value) -> str:
    return f"{label:<40}{value:>10}"


def _usd(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def to_json(result: BenchResult) -> dict:
    """vLLM's result keys where they exist, per-request records under "requests" (seconds)."""
    c, s = result.config, summary_of(result)
    out = {
        "date": time.strftime("%Y%m%d-%H%M%S"), "base_url": c.base_url, "endpoint": c.endpoint, "model_id": result.model,
        "num_prompts": len(result.requests), "request_rate": None if math.isinf(c.request_rate) else c.request_rate,
        "max_concurrency": c.max_concurrency, "seed": c.seed, "random_input_len": c.random_input_len,
        "random_output_len": c.random_output_len, "dataset_path": c.dataset_path, "ignore_eos": c.ignore_eos,
        "price_per_hour": c.price_per_hour,
        "duration": s.duration, "completed": s.completed, "failed": s.failed,
        "total_input_tokens": s.input_tokens, "total_output_tokens": s.output_tokens,
        "request_throughput": s.request_throughput, "input_throughput": s.input_throughput,
        "output_throughput": s.output_throughput, "usd_per_m_input": s.usd_per_m_input,
        "usd_per_m_output": s.usd_per_m_output, "first_error": s.first_error,
    }
    for name, stats in (("ttft", s.ttft), ("tpot", s.tpot), ("itl", s.itl), ("e2el", s.e2e)):
        out.update({f"mean_{name}_ms": _finite(stats.mean), f"median_{name}_ms": _finite(stats.median),
                    f"p99_{name}_ms": _finite(stats.p99)})
    out["requests"] = [{**dataclasses.asdict(r), "e2e": r.e2e, "tpot": r.tpot} for r in result.requests]
    return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def save(result: BenchResult, path: str) -> None:
    Path(path).write_text(json.dumps(to_json(result), indent=2) + "\n")
