"""Prometheus metrics of the server: engine gauges read at scrape time, request latency histograms."""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memshare.outputs import RequestOutput

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# (name, help, stats key); counters get Prometheus' _total suffix.
GAUGES = (
    ("kv_cache_usage_ratio", "Fraction of KV blocks in use", "kv_usage"),
    ("kv_blocks_used", "KV blocks in use", "kv_blocks_used"),
    ("kv_blocks_total", "KV blocks in the pool", "num_kv_blocks"),
    ("kv_blocks_peak", "Most KV blocks in use at once", "kv_blocks_peak"),
    ("num_requests_running", "Sequences in the running batch", "num_running"),
    ("num_requests_waiting", "Sequences waiting for KV blocks or a batch slot", "num_waiting"),
    ("memory_saved_ratio", "Mean over steps of 1 - physical/logical KV blocks", "memory_saved_mean"),
    ("memory_saved_peak_ratio", "1 - physical/logical KV blocks at the peak", "memory_saved_peak"),
    ("affected_ratio", "Shared or evicted entries / generated blocks of finished requests", "affected_ratio"),
    ("generation_tokens_per_second", "Generated tokens per second of engine time", "generation_tokens_per_s"),
)
COUNTERS = (
    ("blocks_shared", "Block-table entries pointed at an earlier physical block", "blocks_shared"),
    ("num_preemptions", "Sequences preempted for KV blocks", "num_preemptions"),
    ("prompt_tokens", "Prompt tokens received", "prompt_tokens"),
    ("generation_tokens", "Tokens generated", "generation_tokens"),
    ("prefix_cache_hits", "Prompt blocks served from the prefix cache", "prefix_cache_hits"),
    ("request_aborted", "Requests aborted before they finished (client gone or shutdown)", "num_aborted"),
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for name, doc, key in GAUGES:
            yield GaugeMetricFamily(f"memshare_{name}", doc, value=stats.get(key, 0))
        for name, doc, key in COUNTERS:
            yield CounterMetricFamily(f"memshare_{name}", doc, value=stats.get(key, 0))


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        self.e2e = Histogram("memshare_e2e_request_latency_seconds", "Request latency from arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("memshare_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("memshare_time_per_output_token_seconds", "Mean time between output tokens",
                              buckets=TOKEN_BUCKETS, registry=self.registry)
        self.finished = Counter("memshare_request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=self.registry)
        self.errors = Counter("memshare_request_errors", "Requests answered with an error, by status",
                              ["status"], registry=self.registry)

    def observe(self, output: RequestOutput) -> None:
        latency, ttft = output.metrics["latency_s"], output.metrics["time_to_first_token_s"]
        self.e2e.observe(latency)
        self.ttft.observe(ttft)
        for sample in output.outputs:
            self.finished.labels(sample.finish_reason).inc()
            if len(sample.token_ids) > 1:
                self.tpot.observe((latency - ttft) / (len(sample.token_ids) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
