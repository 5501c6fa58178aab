"""`memshare serve` started for real on a loopback port and driven with the official `openai` client."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import openai
import pytest

from bench.serve_load import start_server
from tests.conftest import MODEL

KEY = "sk-memshare-test"


def _start(tmp_path, *args: str) -> tuple[subprocess.Popen, str]:
    return start_server(["--model", MODEL, "--kv-cache-memory", "64MiB", *args], tmp_path / "server.log", timeout=180)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, base = _start(tmp_path_factory.mktemp("server"), "--api-key", KEY, "--max-request-bytes", "20000")
    yield base
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def _metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


def _wait_for(base: str, condition, timeout: float = 10) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not condition(metrics := _metrics(base)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(metrics), metrics
    return metrics


def _stream_text(chunks) -> tuple[dict[int, str], dict[int, str], object]:
    texts, reasons, usage = {}, {}, None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            part = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (part or "")
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return texts, reasons, usage


def _errors(base: str, status: int) -> float:
    return _metrics(base).get(f'memshare_request_errors_total{{status="{status}"}}', 0.0)


def test_models_health_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    rejected = _errors(server, 401)
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{server}/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert _errors(server, 401) == rejected + 3


def test_concurrent_greedy_requests_equal_hf(client, prompts, hf_greedy, tokenizer):
    """Eight HTTP requests batched by one engine loop, each token-for-token HF greedy."""
    def complete(ids: list[int]):
        return client.completions.create(model=MODEL, prompt=ids, max_tokens=64, temperature=0, logprobs=0,
                                          extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(complete, prompts))
    for ids, expected, response in zip(prompts, hf_greedy, responses):
        choice = response.choices[0]
        assert choice.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in expected]
        assert response.usage.prompt_tokens == len(ids)
        assert response.usage.completion_tokens == 64
        assert choice.finish_reason == "length"


@pytest.mark.parametrize("stop", [None, ["\n\n"], [" the", "."]])
def test_completion_stream_equals_non_stream(client, tokenizer, stop):
    prompt = "Once upon a time, in a small village by the sea,"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=48, temperature=0, stop=stop)
    full = client.completions.create(**kwargs)
    texts, reasons, usage = _stream_text(client.completions.create(**kwargs, stream=True,
                                                                   stream_options={"include_usage": True}))
    assert texts == {0: full.choices[0].text}
    assert reasons == {0: full.choices[0].finish_reason}
    assert usage.prompt_tokens == len(tokenizer.encode(prompt)) == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens
    if stop:
        assert not any(s in full.choices[0].text for s in stop)


def test_chat_stream_equals_non_stream_with_n_and_seed(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three fruits."}]
    kwargs = dict(model=MODEL, messages=messages, max_tokens=40, temperature=0.8, top_p=0.95, seed=7, n=2)
    full = client.chat.completions.create(**kwargs)
    texts, reasons, usage = _stream_text(client.chat.completions.create(**kwargs, stream=True,
                                                                        stream_options={"include_usage": True}))
    assert texts == {c.index: c.message.content for c in full.choices}
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    assert usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens


def test_logprobs_greedy_token_is_top1(client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                                              max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == max(top.logprob for top in entry.top_logprobs) <= 0
    assert "".join(entry.token for entry in content).startswith(response.choices[0].message.content[:10])


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", {"model": MODEL}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**9}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 10_000}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 1000}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [], "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9], "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 1500, "max_tokens": 4}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 1400, "max_tokens": 100}, 400),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": []}, 400),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 30_000}, 413),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    errors = _errors(server, status)
    response = httpx.post(f"{server}{path}", content=content,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert _errors(server, status) == errors + 1


def test_server_keeps_serving_after_bad_input(server, client):
    httpx.post(f"{server}/v1/completions", content=b"{", headers={"Authorization": f"Bearer {KEY}"})
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert response.usage.completion_tokens == 4
    assert _metrics(server)['memshare_request_errors_total{status="400"}'] >= 1


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    aborted = _metrics(server)["memshare_request_aborted_total"]
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        lines = response.iter_lines()  # kept referenced: closing the iterator would close the connection
        events = []
        while len(events) < 3:
            line = next(lines)
            if line.startswith("data:"):
                events.append(line)
        assert "[DONE]" not in events[-1], events
        assert _wait_for(server, lambda m: m["memshare_kv_blocks_used"] > 0)["memshare_num_requests_running"] == 1
    metrics = _wait_for(server, lambda m: m["memshare_request_aborted_total"] == aborted + 1)
    assert metrics["memshare_kv_blocks_used"] == 0
    assert metrics["memshare_num_requests_running"] == 0


def test_disconnect_before_a_full_response_aborts_and_frees_blocks(server):
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 1000, "ignore_eos": True,
            "temperature": 0}
    aborted = _metrics(server)["memshare_request_aborted_total"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(60, read=3))
    metrics = _wait_for(server, lambda m: m["memshare_request_aborted_total"] == aborted + 1)
    assert metrics["memshare_kv_blocks_used"] == 0
    assert metrics["memshare_num_requests_running"] == 0

def test_metrics_exposes_kv_and_latency(server, client):
    client.completions.create(model=MODEL, prompt="One two three", max_tokens=8, temperature=0)
    metrics = _metrics(server)
    assert metrics["memshare_kv_blocks_total"] == 91
    assert metrics["memshare_generation_tokens_total"] >= 8
    assert metrics["memshare_e2e_request_latency_seconds_count"] >= 1
    assert metrics["memshare_time_to_first_token_seconds_count"] >= 1
    assert metrics['memshare_request_success_total{finished_reason="length"}'] >= 1
    for name in ("memshare_blocks_shared_total", "memshare_memory_saved_ratio", "memshare_num_preemptions_total",
                 "memshare_num_requests_waiting", "memshare_generation_tokens_per_second"):
        assert name in metrics


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits(tmp_path):
    proc, base = _start(tmp_path, "--shutdown-timeout", "8", "--share", "memshare")
    long_body = {"model": MODEL, "prompt": "Write forever.", "max_tokens": 1400, "ignore_eos": True, "stream": True}
    short_body = {"model": MODEL, "prompt": "Write a line.", "max_tokens": 16, "ignore_eos": True, "stream": True}

    def read(body: dict) -> list[str]:
        lines = []
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        lines.append(line)
                        if len(lines) == 2 and body is short_body:
                            proc.send_signal(signal.SIGTERM)
        except httpx.TransportError:
            pass
        return lines

    with ThreadPoolExecutor(2) as pool:
        long_lines = pool.submit(read, long_body)
        time.sleep(0.5)
        short_lines = pool.submit(read, short_body).result()
        long_lines = long_lines.result()
    assert proc.wait(timeout=30) == 0
    assert short_lines[-1] == "data: [DONE]"
    assert json.loads(short_lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert "data: [DONE]" not in long_lines
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health")


def test_serve_cli_rejects_unknown_model():
    result = subprocess.run([sys.executable, "-m", "memshare.entrypoints.cli", "serve", "--model", "no/such/model"],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 2
    assert "no/such/model" in result.stderr
