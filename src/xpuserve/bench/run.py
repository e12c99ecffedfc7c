"""A benchmark run: prompts sent on an arrival schedule under a concurrency limit, all timed."""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field

import httpx

from xpuserve.bench.client import EndpointError, RequestResult, RequestSpec, first_model, send
from xpuserve.bench.dataset import load_jsonl, random_text_prompts, random_token_prompts, token_id_range

DEFAULT_NUM_PROMPTS = 100


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id of GET /v1/models
    endpoint: str = "completions"
    num_prompts: int | None = None  # None: DEFAULT_NUM_PROMPTS, or every prompt of the dataset file
    random_input_len: int = 256
    random_output_len: int = 128
    dataset_path: str | None = None
    tokenizer: str | None = None  # a model or tokenizer folder: random token ids up to its vocabulary
    request_rate: float = math.inf  # requests per second, Poisson arrivals; inf: all at once
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    price_per_hour: float | None = None  # USD per hour of the whole deployment
    extra_body: dict = field(default_factory=dict)


@dataclass
class BenchResult:
    config: BenchConfig
    model: str
    duration: float  # from the first scheduled arrival to the last response's end, seconds
    requests: list[RequestResult]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request arrives: a Poisson process of `rate` per
    second (exponential gaps, the first at 0), or all at 0 when the rate is infinite."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def make_prompts(config: BenchConfig) -> list[str | list[int]]:
    if config.dataset_path is not None:
        return load_jsonl(config.dataset_path, config.num_prompts)
    n = config.num_prompts or DEFAULT_NUM_PROMPTS
    if config.endpoint == "chat":
        return random_text_prompts(n, config.random_input_len, config.seed)
    return random_token_prompts(n, config.random_input_len, token_id_range(config.tokenizer), config.seed)


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Raises EndpointError when the endpoint cannot be reached or names no model."""
    if config.request_rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {config.request_rate}")
    listed = first_model(config.base_url)  # also checks that the server is there
    model = config.model or listed
    if model is None:
        raise EndpointError(f"{config.base_url}/v1/models lists no model: give --model")
    prompts = make_prompts(config)
    spec = RequestSpec(config.base_url, config.endpoint, model, config.random_output_len, config.ignore_eos,
                       config.extra_body)
    arrivals = arrival_times(len(prompts), config.request_rate, config.seed)
    requests, duration = asyncio.run(_send_all(spec, prompts, arrivals, config.max_concurrency))
    return BenchResult(config, model, duration, requests)


async def _send_all(spec: RequestSpec, prompts: list, arrivals: list[float], max_concurrency: int | None):
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:
        clock_zero = time.perf_counter()

        async def one(prompt, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, clock_zero + at - time.perf_counter()))
            result = RequestResult(scheduled=at)
            if limit is None:
                return await send(client, spec, prompt, result, clock_zero)
            async with limit:
                return await send(client, spec, prompt, result, clock_zero)

        requests = await asyncio.gather(*(one(p, at) for p, at in zip(prompts, arrivals)))
    return list(requests), max(r.end for r in requests)
