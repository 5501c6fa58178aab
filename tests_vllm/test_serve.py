"""The README's server recipe with the plugin on: vLLM's OpenAI server (engine core in its own process) on
smollm2-135m shares KV blocks, and the engine core's `memshare:` metrics show on the server's /metrics."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

from prometheus_client import REGISTRY

from memshare.models.weights import resolve_model
from memshare.vllm_plugin.metrics import MemShareMetrics

PASSAGE = ("The river flows past the old mill every spring, carrying leaves and small branches down to the sea, "
           "where the fishermen wait for the tide to turn before they row out to the nets.\n\n")
READY_TIMEOUT = 240.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def post(url: str, body: dict, timeout: float = 300.0) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def samples(text: str, prefix: str) -> dict[str, float]:
    """Exposition lines `name{labels} value` whose name starts with `prefix`: name -> value summed over labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
            values[name] = values.get(name, 0.0) + value
    return values


def wait_ready(server: subprocess.Popen, base: str, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < READY_TIMEOUT:
        assert server.poll() is None, f"server exited with {server.returncode}:\n{log.read_text()[-4000:]}"
        with suppress(OSError):
            get(base + "/health", timeout=2)
            return time.monotonic() - start
        time.sleep(1)
    raise AssertionError(f"server not ready in {READY_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the API server (vLLM shuts its engine core down), then SIGKILL to whatever is left of the group."""
    with suppress(ProcessLookupError):
        server.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
    with suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)


def test_metrics_update() -> None:
    """Counters follow the stats' deltas, gauges their values; unknown or missing keys are skipped."""
    metrics = MemShareMetrics("test-update", engine_index=3)
    metrics.update({"blocks_shared": 4, "affected_ratio": 0.5, "num_steps": 9})
    metrics.update({"blocks_shared": 6, "memory_saved_mean": 0.25, "sharing_seconds": 0.5})

    def value(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"model_name": "test-update", "engine": "3"})

    assert value("memshare:blocks_shared_total") == 6 and value("memshare:sharing_seconds_total") == 0.5
    assert value("memshare:affected_ratio") == 0.5 and value("memshare:memory_saved") == 0.25
    assert value("memshare:stage2_pairs_total") == 0


def test_served_metrics(tmp_path: Path) -> None:
    model, port = str(resolve_model("smollm2-135m")[0]), free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "prometheus").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # conftest's in-process
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0-1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus"),
               MEMSHARE_POLICY="memshare", MEMSHARE_CONFIG='{"step_threshold": 0.5, "block_threshold": 0.5}')
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
               "--block-size", "32", "--enforce-eager", "--max-model-len", "1024", "--host", "127.0.0.1",
               "--port", str(port)]
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        startup = wait_ready(server, base, log)
        start = time.monotonic()
        body = {"model": model, "prompt": [PASSAGE * 2, PASSAGE * 3], "max_tokens": 200, "temperature": 0,
                "ignore_eos": True}
        response = post(base + "/v1/completions", body)
        assert [choice["finish_reason"] for choice in response["choices"]] == ["length", "length"]
        # The hook runs after the step whose output answered the request: give the last update a moment.
        deadline = time.monotonic() + 10
        while True:
            text = get(base + "/metrics")
            memshare = samples(text, "memshare:")
            if memshare.get("memshare:blocks_shared_total", 0) > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(f"start-up {startup:.0f} s, requests {time.monotonic() - start:.0f} s, {memshare}")
        for name in ("memshare:blocks_shared_total", "memshare:stage1_candidates_total",
                     "memshare:stage2_pairs_total", "memshare:memory_saved", "memshare:affected_ratio"):
            assert name in memshare, f"{name} missing from /metrics: {sorted(memshare)}"
        assert memshare["memshare:blocks_shared_total"] > 0
        assert 0 < memshare["memshare:memory_saved"] < 1 and 0 < memshare["memshare:affected_ratio"] <= 1
        assert f'model_name="{model}"' in text
        # vLLM's own metrics of the API server still show in multiprocess mode.
        assert samples(text, "vllm:generation_tokens_total").get("vllm:generation_tokens_total") == 400
    finally:
        stop(server)
