"""`moeray serve`'s OpenAI HTTP API, on a real local Ray cluster, driven by the real `openai` SDK
(and raw httpx where the SDK hides what is checked: status codes, SSE framing, disconnects)."""

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from moeray.actors.engine import Engine
from moeray.actors.sequence import SamplingParams
from moeray.cluster.server import DEFAULT_MODEL_NAME, start
from moeray.cluster.serving import ServingSpec
from moeray.models import DEFAULT_MODEL_DIR, load_model
from moeray.models.tokenizer import Tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_cluster):
    server = start(ServingSpec(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), kv_cache_bytes=16 << 20),
                   log=lambda message: None)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local():
    """The in-process engine on the built-in model: what the server must answer."""
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR)
    engine = Engine(load_model(DEFAULT_MODEL_DIR), tokenizer)

    def complete(prompt: str, max_tokens: int) -> str:
        return engine.generate([tokenizer.encode(prompt)], SamplingParams(max_tokens=max_tokens))[0].text

    return complete


def router_stats(server) -> dict:
    import ray

    return ray.get(server.deployment.router.stats.remote())


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL_NAME]
    for path in ("/health", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(server.http_url + path).status_code == 200


def test_greedy_completion_equals_the_local_engine(client, local):
    for prompt in ("The for statement", "def fibonacci(n):", "A"):
        out = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert out.choices[0].text == local(prompt, 24)
        assert out.usage.completion_tokens == 24 or out.choices[0].finish_reason == "stop"


def test_streamed_chat_and_usage(client):
    chunks = list(client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "What is a list?"}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    whole = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "What is a list?"}],
                                           max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == text and text


def test_sixteen_concurrent_streams_all_complete_with_the_right_text(client, local):
    prompts = [f"The {word} statement" for word in ("for", "if", "while", "try", "with", "del", "pass", "return",
                                                    "yield", "raise", "break", "continue", "import", "global", "assert", "class")]
    results = {}

    def run(prompt):
        stream = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        results[prompt] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {p: local(p, 16) for p in prompts}


@pytest.mark.parametrize("body, status, fragment", [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "x " * 3000}, 400, "context"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens=0"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_p": "high"}, 400, "top_p"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ({"prompt": [1, 2, 99999]}, 400, "99999"),
])
def test_bad_requests_get_a_named_error_and_the_server_serves_on(server, client, body, status, fragment):
    body = {"model": DEFAULT_MODEL_NAME, **body}
    response = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]
    assert client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The", max_tokens=2).choices[0].text


def test_malformed_json_is_a_400(server):
    response = httpx.post(f"{server.http_url}/v1/chat/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_client_that_disconnects_mid_stream_leaves_nothing_behind(server):
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "The for statement", "max_tokens": 500, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", f"{server.http_url}/v1/completions", json=body, timeout=60) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = router_stats(server)
        if stats["streams"] == 0 and stats["running"] == 0 and stats["free_kv_blocks"] == stats["kv_blocks"]:
            break
        time.sleep(0.2)
    assert stats["streams"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_kv_blocks"] == stats["kv_blocks"], "the aborted sequence's KV blocks must be freed"


def test_sse_framing_ends_with_done(server):
    body = {"model": DEFAULT_MODEL_NAME, "prompt": "The", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.http_url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])


def _scrape(server) -> dict:
    """{(name, labels...): value} of every sample on the metrics port, via prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.metrics_url, timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict, name: str, **labels) -> float:
    """A sample's value; 0 for a labelled counter series not created yet (e.g. no request finished that way)."""
    key = (name, tuple(sorted({"model_name": DEFAULT_MODEL_NAME, **labels}.items())))
    return samples.get(key, 0.0) if "finish_reason" in labels else samples[key]


def test_prometheus_metrics_add_up(server, client):
    before = _scrape(server)
    prompts = ["The for statement", "A list comprehension", "def main():"]
    usage = [client.completions.create(model=DEFAULT_MODEL_NAME, prompt=p, max_tokens=5 + i, temperature=0).usage
             for i, p in enumerate(prompts)]
    after = _scrape(server)

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("moeray_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    assert delta("moeray_generation_tokens_total") == sum(u.completion_tokens for u in usage)
    assert sum(delta("moeray_request_success_total", finish_reason=r) for r in ("length", "stop")) == 3
    assert delta("moeray_time_to_first_token_seconds_count") == 3
    assert delta("moeray_e2e_request_latency_seconds_count") == 3
    assert delta("moeray_inter_token_latency_seconds_count") == sum(u.completion_tokens - 1 for u in usage)
    # every MoE layer routes every computed token top_k (2) times
    computed = _value(after, "moeray_computed_tokens_total")
    layers = sorted({dict(k[1])["layer"] for k in after if k[0] == "moeray_expert_tokens_total"})
    assert layers == ["0", "1", "2", "3"] and computed > 0
    for layer in layers:
        routed = sum(v for (name, labels), v in after.items()
                     if name == "moeray_expert_tokens_total" and dict(labels)["layer"] == layer)
        assert routed == 2 * computed
    assert _value(after, "moeray_placement_version") == 0
    assert {dict(k[1])["group"] for k in after if k[0] == "moeray_group_load_tokens"} == {"0", "1"}
    assert all(_value(after, "moeray_layer_imbalance", layer=layer) >= 1.0 for layer in layers)
    assert _value(after, "moeray_num_requests_running") == 0
    assert _value(after, "moeray_migrations_total", result="failed") == 0


def test_an_oversized_body_gets_413_and_the_server_serves_on(server, client):
    big = json.dumps({"model": DEFAULT_MODEL_NAME, "prompt": "x" * (5 << 20), "max_tokens": 1})
    response = httpx.post(f"{server.http_url}/v1/completions", content=big, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large" and "4194304" in response.json()["error"]["message"]

    def chunks():  # no Content-Length: the cap is enforced while reading
        for _ in range(5):
            yield b"x" * (1 << 20)

    response = httpx.post(f"{server.http_url}/v1/chat/completions", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The", max_tokens=2).choices[0].text
