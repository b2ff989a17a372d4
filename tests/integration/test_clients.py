"""Clients on a real server: load attributed per client, a saturating client flagged, a token rate enforced.

Clients name themselves with the `x-moeray-client` header (the `openai` SDK's `default_headers`).
Ordinary clients send varied text; "mallory" sends one token repeated, so that every token of hers
is routed to the same few experts — the shape of an expert-saturation attack.
"""

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moeray.cluster.server import DEFAULT_MODEL_NAME, start
from moeray.cluster.serving import ServingSpec
from test_serve_http import free_port

TOKEN = "clients-admin-token"
ORDINARY = ["The for statement in Python iterates over the items of any sequence, in order.",
            "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
            "Exceptions are raised with the raise statement and handled with try and except clauses.",
            "A list comprehension consists of brackets containing an expression followed by a for clause.",
            "Modules can import other modules; it is customary to place all import statements at the top."]
MALLORY = " ".join(["zzzz"] * 30)  # 121 tokens


@pytest.fixture(scope="module")
def server(ray_cluster):
    server = start(ServingSpec(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), expert_groups=1,
                               autoscaler=False, admin_token=TOKEN, saturation_min_pairs=200, saturation_score=1.4,
                               client_token_rate_limit=100.0), log=lambda m: None)  # a burst of 1000
    yield server
    server.stop()


def _client(server, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60,
                         default_headers={"x-moeray-client": name})


def test_a_client_that_concentrates_routing_is_flagged_and_ordinary_ones_are_not(server):
    for name in ("alice", "bob"):
        for prompt in ORDINARY:
            _client(server, name).completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=8)
    for _ in range(3):  # 3 x (121 + 8) tokens: within her rate
        _client(server, "mallory").completions.create(model=DEFAULT_MODEL_NAME, prompt=MALLORY, max_tokens=8)
    rows = {r["client"]: r for r in httpx.get(f"{server.http_url}/admin/clients", timeout=30,
                                               headers={"Authorization": f"Bearer {TOKEN}"}).json()}
    assert set(rows) >= {"alice", "bob", "mallory"}
    assert rows["mallory"]["flagged"], {c: round(r["score"], 2) for c, r in rows.items()}
    assert not rows["alice"]["flagged"] and not rows["bob"]["flagged"], (rows["alice"]["score"], rows["bob"]["score"])
    assert rows["mallory"]["score"] > max(rows["alice"]["score"], rows["bob"]["score"])
    assert rows["mallory"]["pairs"] >= 200 and len(rows["mallory"]["hot_experts"]) == 4
    samples = {(s.name, s.labels.get("client")): s.value
               for f in text_string_to_metric_families(httpx.get(server.metrics_url, timeout=30).text) for s in f.samples}
    assert samples[("moeray_saturation_flagged_clients", None)] == 1
    assert samples[("moeray_client_concentration", "mallory")] == pytest.approx(rows["mallory"]["score"])


def test_a_client_over_its_token_rate_gets_429_and_others_are_unaffected(server):
    greedy = _client(server, "greedy")
    stream = greedy.completions.create(model=DEFAULT_MODEL_NAME, prompt="The", max_tokens=600, stream=True)
    next(iter(stream))  # admitted: ~600 of its 1000-token burst spent
    with pytest.raises(openai.RateLimitError, match="client 'greedy' is over its token rate"):
        greedy.completions.create(model=DEFAULT_MODEL_NAME, prompt="The", max_tokens=600)
    stream.close()
    assert _client(server, "patient").completions.create(model=DEFAULT_MODEL_NAME, prompt="The", max_tokens=4)
