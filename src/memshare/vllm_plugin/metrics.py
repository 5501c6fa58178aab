"""MemShare's counters as Prometheus metrics, written by vLLM's engine core.

`vllm serve` answers /metrics from its API server process, so metrics of the engine-core process show there only in
prometheus_client's multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` (an empty directory) must be in the environment
`vllm serve` starts with. vLLM sets it itself only for `--api-server-count` > 1; the engine core inherits it, and the
API server then collects every process's metric files. Without it the metrics stay in the engine core's default
registry (the in-process `LLM`'s process, for `prometheus_client.start_http_server`) and nothing else changes.
"""

from prometheus_client import Counter, Gauge

# stats() key -> metric name, help. Counters get the stats' deltas; the multiprocess collector sums them over pids.
_COUNTERS = {
    "blocks_shared": ("memshare:blocks_shared", "KV blocks MemShare shared (pointed at an earlier, similar block)."),
    "stage1_candidates": ("memshare:stage1_candidates", "Step pairs MemShare's stage 1 proposed."),
    "stage2_pairs": ("memshare:stage2_pairs", "Block pairs MemShare's stage 2 scored on the KV cache."),
    "sharing_seconds": ("memshare:sharing_seconds", "Seconds the engine core spent in MemShare after its steps."),
}
# Gauges: ratios over the engine's life; of several processes' files the newest value counts.
_GAUGES = {
    "memory_saved_mean": ("memshare:memory_saved", "Mean fraction of KV blocks MemShare saved per step."),
    "affected_ratio": ("memshare:affected_ratio", "Fraction of generated KV blocks MemShare shared."),
}
_LABELS = ("model_name", "engine")
_families: dict[str, Counter | Gauge] = {}  # once per process: prometheus_client refuses a name registered twice


def _family(key: str) -> Counter | Gauge:
    if key not in _families:
        if key in _COUNTERS:
            _families[key] = Counter(*_COUNTERS[key], labelnames=_LABELS)
        else:
            _families[key] = Gauge(*_GAUGES[key], labelnames=_LABELS, multiprocess_mode="mostrecent")
    return _families[key]


class MemShareMetrics:
    """One engine core's MemShare metrics, labelled like vLLM's own (`model_name`, `engine`).

    `update(stats)` takes `VllmMemShare.stats()` (cumulative counts and ratios) after a step; keys it does not
    know or that are missing are skipped. Counters are exposed with vLLM's `_total` suffix
    (`memshare:blocks_shared_total`), gauges as named (`memshare:memory_saved`, `memshare:affected_ratio`).
    """

    def __init__(self, model_name: str, engine_index: int = 0) -> None:
        labels = {"model_name": model_name, "engine": str(engine_index)}
        self._metrics = {key: _family(key).labels(**labels) for key in (*_COUNTERS, *_GAUGES)}
        self._last: dict[str, float] = {}

    def update(self, stats: dict[str, float | int]) -> None:
        for key, value in stats.items():
            metric = self._metrics.get(key)
            if metric is None:
                continue
            if key in _GAUGES:
                metric.set(value)
                continue
            delta = value - self._last.get(key, 0)
            if delta > 0:  # a counter only goes up; a smaller value (new baseline) only moves the baseline
                metric.inc(delta)
            self._last[key] = value
