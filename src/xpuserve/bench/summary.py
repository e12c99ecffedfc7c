"""A run's aggregate numbers: counts, throughputs, latency statistics and cost per million tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpuserve.bench.client import RequestResult
from xpuserve.planner.cost import usd_per_million


@dataclass
class Stats:
    """Milliseconds."""

    mean: float
    median: float
    p99: float

    @staticmethod
    def of(seconds: list[float]) -> Stats:
        if not seconds:
            return Stats(float("nan"), float("nan"), float("nan"))
        ms = np.asarray(seconds) * 1e3
        return Stats(float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 99)))


@dataclass
class Summary:
    completed: int
    failed: int
    duration: float  # seconds
    input_tokens: int
    output_tokens: int
    request_throughput: float  # completed requests per second
    input_throughput: float  # tokens per second
    output_throughput: float
    ttft: Stats
    tpot: Stats
    itl: Stats
    e2e: Stats
    first_error: str | None
    usd_per_m_input: float | None  # given a price per hour
    usd_per_m_output: float | None


def summarize(requests: list[RequestResult], duration: float, price_per_hour: float | None = None) -> Summary:
    ok = [r for r in requests if r.ok]
    failed = [r for r in requests if not r.ok]
    inputs, outputs = sum(r.input_tokens for r in ok), sum(r.output_tokens for r in ok)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    cost = (lambda tps: usd_per_million(price_per_hour, tps)) if price_per_hour is not None else (lambda tps: None)
    return Summary(
        completed=len(ok), failed=len(failed), duration=duration, input_tokens=inputs, output_tokens=outputs,
        request_throughput=rate(len(ok)), input_throughput=rate(inputs), output_throughput=rate(outputs),
        ttft=Stats.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=Stats.of([r.tpot for r in ok if r.tpot is not None]),
        itl=Stats.of([gap for r in ok for gap in r.itl]),
        e2e=Stats.of([r.e2e for r in ok]),
        first_error=failed[0].error if failed else None,
        usd_per_m_input=cost(rate(inputs)), usd_per_m_output=cost(rate(outputs)),
    )
