"""Prometheus metrics of the server: engine gauges read at scrape time, request latency histograms. Each metric
whose meaning is vLLM's is also exported under vLLM's name and labels (`vllm:*`, model_name and engine), so vLLM's
dashboards work unchanged."""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from memshare.outputs import RequestOutput

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
VLLM_LABELS = ("model_name", "engine")

# (memshare name, vLLM name or None, help, stats key); counters get Prometheus' _total suffix.
GAUGES = (
    ("kv_cache_usage_ratio", "kv_cache_usage_perc", "Fraction of KV blocks in use (1 = 100%)", "kv_usage"),
    ("kv_blocks_used", None, "KV blocks in use", "kv_blocks_used"),
    ("kv_blocks_total", None, "KV blocks in the pool", "num_kv_blocks"),
    ("kv_blocks_peak", None, "Most KV blocks in use at once", "kv_blocks_peak"),
    ("num_requests_running", "num_requests_running", "Sequences in the running batch", "num_running"),
    ("num_requests_waiting", "num_requests_waiting", "Sequences waiting for KV blocks or a batch slot",
     "num_waiting"),
    ("memory_saved_ratio", None, "Mean over steps of 1 - physical/logical KV blocks", "memory_saved_mean"),
    ("memory_saved_peak_ratio", None, "1 - physical/logical KV blocks at the peak", "memory_saved_peak"),
    ("affected_ratio", None, "Shared or evicted entries / generated blocks of finished requests", "affected_ratio"),
    ("generation_tokens_per_second", None, "Generated tokens per second of engine time", "generation_tokens_per_s"),
)
COUNTERS = (
    ("blocks_shared", None, "Block-table entries pointed at an earlier physical block", "blocks_shared"),
    ("num_preemptions", "num_preemptions", "Sequences preempted for KV blocks", "num_preemptions"),
    ("prompt_tokens", "prompt_tokens", "Prompt tokens received", "prompt_tokens"),
    ("generation_tokens", "generation_tokens", "Tokens generated", "generation_tokens"),
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
     "prefix_cache_queries"),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens served from the prefix cache", "prefix_cache_hits"),
    ("request_aborted", None, "Requests aborted before they finished (client gone or shutdown)", "num_aborted"),
)
# (memshare name, vLLM name, help, buckets)
HISTOGRAMS = (
    ("e2e_request_latency_seconds", "e2e_request_latency_seconds", "Request latency from arrival to last token",
     LATENCY_BUCKETS),
    ("time_to_first_token_seconds", "time_to_first_token_seconds", "Time from arrival to the first token",
     LATENCY_BUCKETS),
    ("time_per_output_token_seconds", "request_time_per_output_token_seconds", "Mean time between output tokens",
     TOKEN_BUCKETS),
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict], model_name: str) -> None:
        self.stats, self.labels = stats, [model_name, "0"]  # vLLM's: one engine, index 0

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for family, metrics in ((GaugeMetricFamily, GAUGES), (CounterMetricFamily, COUNTERS)):
            for name, vllm_name, doc, key in metrics:
                yield family(f"memshare_{name}", doc, value=stats.get(key, 0))
                if vllm_name:
                    vllm = family(f"vllm:{vllm_name}", doc, labels=VLLM_LABELS)
                    vllm.add_metric(self.labels, stats.get(key, 0))
                    yield vllm


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        self.labels = (model_name, "0")  # vLLM's: one engine, index 0
        # name -> the memshare histogram and its vLLM twin; both observe every value
        self.histograms = {name: (Histogram(f"memshare_{name}", doc, buckets=buckets, registry=self.registry),
                                  Histogram(f"vllm:{vllm_name}", doc, VLLM_LABELS, buckets=buckets,
                                            registry=self.registry).labels(*self.labels))
                           for name, vllm_name, doc, buckets in HISTOGRAMS}
        self.finished = Counter("memshare_request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=self.registry)
        self.vllm_finished = Counter("vllm:request_success", "Finished requests by finish reason",
                                     [*VLLM_LABELS, "finished_reason"], registry=self.registry)
        self.errors = Counter("memshare_request_errors", "Requests answered with an error, by status",
                              ["status"], registry=self.registry)

    def observe(self, output: RequestOutput) -> None:
        latency, ttft = output.metrics["latency_s"], output.metrics["time_to_first_token_s"]
        self._observe("e2e_request_latency_seconds", latency)
        self._observe("time_to_first_token_seconds", ttft)
        for sample in output.outputs:
            self.finished.labels(sample.finish_reason).inc()
            self.vllm_finished.labels(*self.labels, sample.finish_reason).inc()
            if len(sample.token_ids) > 1:
                self._observe("time_per_output_token_seconds", (latency - ttft) / (len(sample.token_ids) - 1))

    def _observe(self, name: str, value: float) -> None:
        for histogram in self.histograms[name]:
            histogram.observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
