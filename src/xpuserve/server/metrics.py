"""Prometheus metrics, named like vLLM's so existing dashboards work (`xpuserve:` instead of `vllm:`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from xpuserve.engine.outputs import EngineStats, RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("xpuserve:request_success", "Finished requests by finish reason", ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("xpuserve:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("xpuserve:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("xpuserve:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("xpuserve:time_per_output_token_seconds", "Time per output token after the first", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("xpuserve:e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("xpuserve:num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("xpuserve:num_requests_waiting", "Sequences waiting to run", registry=r)
        self.kv_usage = Gauge("xpuserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use", registry=r)
        self.prefix_hit_rate = Gauge("xpuserve:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens", registry=r)
        self.preemptions = Gauge("xpuserve:num_preemptions", "Sequences preempted so far", registry=r)

    def record_finished(self, output: RequestOutput) -> None:
        m = output.metrics
        generated = sum(len(c.token_ids) for c in output.outputs)
        for completion in output.outputs:
            self.requests.labels(completion.finish_reason or "abort").inc()
        self.prompt_tokens.inc(m.num_prompt_tokens)
        self.generation_tokens.inc(generated)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            if m.finish_time is not None:
                self.e2e.observe(m.finish_time - m.arrival_time)
                longest = max(len(c.token_ids) for c in output.outputs)
                if longest > 1:
                    self.tpot.observe((m.finish_time - m.first_token_time) / (longest - 1))

    def render(self, stats: EngineStats) -> bytes:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        self.preemptions.set(stats.num_preemptions)
        return generate_latest(self.registry)
