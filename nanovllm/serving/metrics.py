"""Prometheus metrics of the server, in one registry per app (two servers in one process do not collide).

Engine state (running/waiting requests, KV-cache usage, prefix-cache counters) is read from the
engine loop's last stats snapshot at scrape time; latencies and token counts are recorded by the
request handlers as the client sees them.
"""

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nanovllm.serving.async_llm import AsyncLLM

PREFIX = "nanovllm:"  # as vLLM's "vllm:" metric names
# Histogram buckets in seconds, spanning a GPU decode step (ms) to a slow CPU run (tens of seconds).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class EngineStatsCollector(Collector):
    """Gauges and counters taken from AsyncLLM.stats() when Prometheus scrapes."""

    def __init__(self, async_llm: AsyncLLM) -> None:
        self.async_llm = async_llm

    def collect(self) -> Iterator[Metric]:
        stats = self.async_llm.stats()
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        gauges = {
            "num_requests_running": ("Requests in the running batch", stats.num_running),
            "num_requests_waiting": ("Requests waiting to be prefilled", stats.num_waiting),
            "kv_cache_usage_perc": ("Share of KV-cache blocks in use, 0..1", stats.kv_cache_usage),
            "prefix_cache_hit_rate": ("Prompt tokens found in the prefix cache / looked up", hit_rate),
        }
        counters = {
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache", stats.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache", stats.prefix_cache_hits),
            "num_aborted_requests": ("Requests aborted before finishing", self.async_llm.num_aborted_requests),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, documentation, value)
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(PREFIX + name, documentation, value)


class ServerMetrics:
    """The registry /metrics renders, and the per-request instruments the handlers feed."""

    def __init__(self, async_llm: AsyncLLM) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(async_llm))
        self.prompt_tokens = Counter(
            f"{PREFIX}prompt_tokens", "Prompt tokens of accepted requests", registry=self.registry
        )
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated", registry=self.registry)
        self.lora_requests = Counter(
            f"{PREFIX}lora_requests", "Requests accepted, by LoRA adapter", ["lora_name"], registry=self.registry
        )
        self.request_success = Counter(
            f"{PREFIX}request_success", "Requests finished, by reason", ["finished_reason"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "Arrival to first token",
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.engine_time_to_first_token = Histogram(
            f"{PREFIX}engine_time_to_first_token_seconds",
            "Request handed to the engine to its first token, as the engine loop sees it",
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        async_llm.first_token_observers.append(self.engine_time_to_first_token.observe)
        self.inter_token_latency = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Gap between a request's tokens",
            buckets=ITL_BUCKETS_S,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            f"{PREFIX}e2e_request_latency_seconds",
            "Arrival to last token",
            buckets=E2E_BUCKETS_S,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ChoiceTimer:
    """Records one choice's token timings into ServerMetrics as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics, arrival_s: float) -> None:
        self.metrics = metrics
        self.arrival_s = arrival_s  # time.perf_counter() when the HTTP request arrived
        self.last_token_s: float | None = None  # when this choice's previous tokens arrived

    def record(self, num_new_tokens: int, finish_reason: str | None) -> None:
        now_s = time.perf_counter()
        if num_new_tokens:
            if self.last_token_s is None:
                self.metrics.time_to_first_token.observe(now_s - self.arrival_s)
            else:
                self.metrics.inter_token_latency.observe(now_s - self.last_token_s)
            self.last_token_s = now_s
            self.metrics.generation_tokens.inc(num_new_tokens)
        if finish_reason is not None:
            self.metrics.e2e_request_latency.observe(now_s - self.arrival_s)
            self.metrics.request_success.labels(finished_reason=finish_reason).inc()
