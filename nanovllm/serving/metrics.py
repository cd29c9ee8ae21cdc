"""Prometheus metrics of the server, in one registry per app (two servers in one process do not collide).

Engine state (running/waiting requests, KV-cache usage, prefix-cache counters) is read from the
engine loop's last stats snapshot at scrape time; latencies and token counts are recorded by the
request handlers as the client sees them. A request's time to its first token is also split into
stages, one histogram each (vLLM's request_queue_time_seconds and request_prefill_time_seconds are two):

    body received ─parse─► handler ─tokenize─► sent to the engine loop ─handoff─► taken ─queue─► first step
    launched ─prefill─► first token in the engine loop ─return─► on the event loop ─dispatch─► in its handler

Every latency histogram also keeps its latest raw observations (``samples()``, served as JSON at
/metrics/samples), so that benchmarks can give exact percentiles rather than bucket bounds.
"""

import time
from array import array
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nanovllm.outputs import StreamOutput
from nanovllm.serving.async_llm import AsyncLLM
from nanovllm.serving.request_timing import FirstTokenTimes

PREFIX = "nanovllm:"  # as vLLM's "vllm:" metric names
# Histogram buckets in seconds, spanning a GPU decode step (ms) to a slow CPU run (tens of seconds).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
# A stage can take 100 us (a hand-off) or seconds (a long prompt's prefill on a CPU).
STAGE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
NUM_KEPT_SAMPLES = 1 << 16  # raw observations kept per histogram: 512 KiB each, allocated at start
# The stages of a request's time to first token: name -> what the histogram times.
STAGES = {
    "request_parse_time_seconds": "Body received to its handler: JSON parsing and validation",
    "request_tokenize_time_seconds": "Handler to prompt token ids: tokenizing and chat template, on the pool",
    "request_handoff_time_seconds": "Sent to the engine loop to taken by it",
    "request_queue_time_seconds": "Taken by the engine loop to the turn that launched its first step",
    "request_prefill_time_seconds": "First step launched to first token in the engine loop (scheduling ahead: "
    "the step already on the device, the request's own, and the recording)",
    "request_return_time_seconds": "First token in the engine loop to the event loop",
    "request_dispatch_time_seconds": "First token on the event loop to the request's handler",
}


class KeptSamples:
    """The latest NUM_KEPT_SAMPLES values of a histogram, in a buffer written in full at construction (so that
    the process's memory does not grow as it fills)."""

    def __init__(self, capacity: int = NUM_KEPT_SAMPLES) -> None:
        self.values = array("d", [0.0]) * capacity  # a ring: value i is at i % capacity
        self.count = 0  # values added so far

    def add(self, value: float) -> None:
        self.values[self.count % len(self.values)] = value
        self.count += 1

    def latest(self, num: int) -> list[float]:
        """The last ``num`` values kept (fewer when fewer are), oldest first."""
        capacity = len(self.values)
        num = min(num, self.count, capacity)
        return [self.values[i % capacity] for i in range(self.count - num, self.count)]


class SampledHistogram:
    """A Prometheus histogram whose latest raw observations are kept too."""

    def __init__(self, registry: CollectorRegistry, name: str, documentation: str, buckets: tuple) -> None:
        self.histogram = Histogram(PREFIX + name, documentation, buckets=buckets, registry=registry)
        self.kept = KeptSamples()

    def observe(self, seconds: float) -> None:
        self.histogram.observe(seconds)
        self.kept.add(seconds)


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
        self.registry = registry = CollectorRegistry()
        registry.register(EngineStatsCollector(async_llm))
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of accepted requests", registry=registry)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated", registry=registry)
        self.lora_requests = Counter(
            f"{PREFIX}lora_requests", "Requests accepted, by LoRA adapter", ["lora_name"], registry=registry
        )
        self.request_success = Counter(
            f"{PREFIX}request_success", "Requests finished, by reason", ["finished_reason"], registry=registry
        )
        latencies = {
            "time_to_first_token_seconds": ("Arrival to first token", TTFT_BUCKETS_S),
            "engine_time_to_first_token_seconds": (
                "Request handed to the engine to its first token, as the engine loop sees it",
                TTFT_BUCKETS_S,
            ),
            "inter_token_latency_seconds": ("Gap between a request's tokens", ITL_BUCKETS_S),
            "e2e_request_latency_seconds": ("Arrival to last token", E2E_BUCKETS_S),
            **{name: (documentation, STAGE_BUCKETS_S) for name, documentation in STAGES.items()},
        }
        self.latencies = {
            name: SampledHistogram(registry, name, documentation, buckets)
            for name, (documentation, buckets) in latencies.items()
        }
        async_llm.first_token_observers.append(self.observe_engine_stages)

    def observe(self, name: str, seconds: float) -> None:
        self.latencies[name].observe(seconds)

    def observe_engine_stages(self, times: FirstTokenTimes, returned_s: float) -> None:
        """A request's way through the engine loop to its first token (AsyncLLM calls this)."""
        self.observe("engine_time_to_first_token_seconds", times.first_token_s - times.submitted_s)
        self.observe("request_handoff_time_seconds", times.taken_s - times.submitted_s)
        self.observe("request_queue_time_seconds", times.launched_s - times.taken_s)
        self.observe("request_prefill_time_seconds", times.first_token_s - times.launched_s)
        self.observe("request_return_time_seconds", returned_s - times.first_token_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def samples(self, num_latest: int) -> dict[str, Any]:
        """Each latency histogram's count and its latest ``num_latest`` raw observations, in seconds."""
        return {
            PREFIX + name: {"count": sampled.kept.count, "latest": sampled.kept.latest(num_latest)}
            for name, sampled in self.latencies.items()
        }


class ChoiceTimer:
    """Records one choice's token timings into ServerMetrics as its outputs arrive."""

    def __init__(self, metrics: ServerMetrics, arrival_s: float) -> None:
        self.metrics = metrics
        self.arrival_s = arrival_s  # time.perf_counter() when the HTTP request arrived
        self.last_token_s: float | None = None  # when this choice's previous tokens arrived

    def record(self, out: StreamOutput, first_output_s: dict[str, float]) -> None:
        """Count an output as its handler takes it; ``first_output_s`` (RequestStream.first_output_s): when each
        request's first output reached its stream, where the dispatch stage begins."""
        now_s = time.perf_counter()
        if out.new_token_ids:
            if self.last_token_s is None:
                self.metrics.observe("time_to_first_token_seconds", now_s - self.arrival_s)
                self.metrics.observe("request_dispatch_time_seconds", now_s - first_output_s.get(out.request_id, now_s))
            else:
                self.metrics.observe("inter_token_latency_seconds", now_s - self.last_token_s)
            self.last_token_s = now_s
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
        if out.finish_reason is not None:
            self.metrics.observe("e2e_request_latency_seconds", now_s - self.arrival_s)
            self.metrics.request_success.labels(finished_reason=out.finish_reason).inc()
