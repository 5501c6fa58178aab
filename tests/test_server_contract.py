"""The server against its own OpenAPI document: a schemathesis run, and the contract points it cannot judge."""

import signal

import httpx2 as httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema

from bench.serve_load import start_server
from tests.conftest import MODEL

KEY = "sk-contract"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Small limits keep every fuzzed generation short: at most 2 samples of 4 tokens.
    proc, base = start_server(["--model", MODEL, "--kv-cache-memory", "64MiB", "--max-model-len", "256",
                               "--api-key", KEY, "--max-tokens-limit", "4", "--max-n", "2",
                               "--max-request-bytes", "4000"],
                              tmp_path_factory.mktemp("contract") / "server.log", timeout=180)
    yield base
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def _fuzz(base: str) -> tuple[int, list[str]]:
    """One seeded schemathesis run (examples, coverage incl. wrong methods, fuzzing): requests sent, failures."""
    config = SchemathesisConfig.from_dict({
        "seed": 1, "headers": AUTH, "request-timeout": 30, "generation": {"max-examples": 10},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": True,
                   # Schema-valid bodies may still be refused (a prompt over the context, an unknown model): 400/404.
                   "positive_data_acceptance": {"enabled": False},
                   "negative_data_rejection": {"expected-statuses": [400, 401, 413]}}})
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", config=config)
    num_requests, failures = 0, []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            num_requests += len(event.recorder.interactions)
            for case_id, checks in event.recorder.checks.items():
                interaction = event.recorder.interactions.get(case_id)
                failures += [f"{event.recorder.label} {check.name}: {check.failure_info.failure.title}\n"
                             f"{interaction.request.body if interaction else ''}"
                             for check in checks if check.failure_info is not None]
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.append(str(event))
    return num_requests, failures


def test_schemathesis_finds_no_server_error_or_contract_mismatch(server):
    num_requests, failures = _fuzz(server)
    assert num_requests > 300
    assert not failures, "\n".join(sorted(set(failures)))
    assert httpx.get(f"{server}/health").status_code == 200  # the engine survived every input


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"echo": True}, "echo"),
])
def test_unsupported_parameters_are_400_naming_them(server, path, extra, param):
    body = {**CHAT, **extra} if "chat" in path else {"model": MODEL, "prompt": "hi", "max_tokens": 4, **extra}
    error = _error(httpx.post(f"{server}{path}", json=body, headers=AUTH), 400)
    assert error == {"message": f"{param} is not supported by this server", "type": "invalid_request_error",
                     "param": param, "code": None}


@pytest.mark.parametrize("extra,param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"temperature": "hot"}, "temperature"),
    ({"seed": 2**64}, "seed"), ({"min_tokens": 5}, "min_tokens"),
    ({"max_completion_tokens": 99}, "max_completion_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.[0].role"),
])
def test_bad_values_are_400_naming_the_parameter(server, extra, param):
    error = _error(httpx.post(f"{server}/v1/chat/completions", json={**CHAT, **extra}, headers=AUTH), 400)
    assert error["param"] == param
    assert error["message"].startswith(param) and "Value error" not in error["message"]


def test_penalties_and_seed_are_accepted_and_used(server):
    def complete(prompt: str, **extra) -> str:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, **extra}
        response = httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    # The penalties reach the sampler: repetition counts the prompt's tokens, presence and frequency the output's
    # (negative: the greedy " the one that is" repeats " the").
    ones, fruit = "1, 1, 1, 1, 1, 1, 1, 1,", "The best fruit is"
    assert complete(ones, repetition_penalty=5.0) != complete(ones)
    assert complete(fruit, presence_penalty=-2.0, frequency_penalty=-2.0) != complete(fruit)
    seeded = dict(temperature=1.0, seed=3, presence_penalty=0.5)
    assert complete(fruit, **seeded) == complete(fruit, **seeded)


def test_wrong_method_is_405_with_allow(server):
    for method, path, allow in (("GET", "/v1/chat/completions", "POST"), ("POST", "/health", "GET"),
                                ("DELETE", "/metrics", "GET")):
        response = httpx.request(method, f"{server}{path}", headers=AUTH)
        assert _error(response, 405)["type"] == "invalid_request_error"
        assert response.headers["allow"] == allow


def test_metrics_has_vllm_names_and_prometheus_text_type(server):
    assert httpx.post(f"{server}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=60).status_code == 200
    response = httpx.get(f"{server}/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in response.text.splitlines()
              if line and line[0] != "#"}
    labels = f'{{engine="0",model_name="{MODEL}"}}'
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        assert name + labels in values, name
    for name in ("prompt_tokens_total", "generation_tokens_total", "e2e_request_latency_seconds_count",
                 "time_to_first_token_seconds_count"):
        assert values[f"vllm:{name}{labels}"] == values[f"memshare_{name}"] > 0, name
    assert "# TYPE vllm:num_preemptions_total counter" in response.text
    assert "# TYPE vllm:kv_cache_usage_perc gauge" in response.text
    success = f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{MODEL}"}}'
    assert values[success] == values['memshare_request_success_total{finished_reason="length"}']


def test_openapi_documents_errors_limits_and_metrics_type(server):
    schema = httpx.get(f"{server}/openapi.json").json()
    completions = schema["paths"]["/v1/chat/completions"]["post"]
    assert set(completions["responses"]) == {"200", "400", "401", "404", "405", "413", "500", "503"}
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    assert completions["responses"]["400"]["content"]["application/json"]["schema"] == error_ref
    assert "Allow" in completions["responses"]["405"]["headers"]
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert completions["security"] == [{"apiKey": []}]
    assert "4000 bytes" in completions["responses"]["413"]["description"]
    properties = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert properties["n"]["maximum"] == 2
    assert {"type": "integer", "minimum": 1, "maximum": 4} in properties["max_tokens"]["anyOf"]
    assert properties["tools"]["type"] == "null"
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    metrics = schema["paths"]["/metrics"]["get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain; version=0.0.4; charset=utf-8"]
    assert metrics["405"]["content"]["application/json"]["schema"] == error_ref
