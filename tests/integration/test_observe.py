"""`moeray top` and `moeray load dump` + `load plot` against a real server on a real local Ray cluster.

After a few completions, `top --once --json` must give the documented fields, and the expert load
must add up: every MoE layer routes each token it sees to top_k experts, so each layer's window sums
to top_k x the tokens the steps ran (prompt tokens plus every generated token but the last).
"""

import json

import httpx
import pytest
from matplotlib.image import imread

from moeray.cluster import cli
from moeray.cluster.server import DEFAULT_MODEL_NAME, start
from moeray.cluster.serving import ServingSpec
from moeray.models import DEFAULT_MODEL_DIR
from test_serve_http import free_port

TOKEN = "test-top-token"
FIELDS = {"time", "url", "plan_version", "staging_version", "num_layers", "num_experts", "num_groups",
          "slots_per_group", "window_s", "window_steps", "steps", "load", "tokens_per_layer", "replica_count",
          "group_load", "group_share", "imbalance", "top_experts", "throughput", "router", "autoscaler"}


@pytest.fixture(scope="module")
def server(ray_cluster):
    server = start(ServingSpec(http_port=free_port(), grpc_port=free_port(), admin_token=TOKEN,
                               kv_cache_bytes=16 << 20), log=lambda message: None)
    yield server
    server.stop()


def _complete(server, prompt: str, max_tokens: int) -> int:
    """Tokens the steps ran for one completion: prompt + generated - 1 (the last is never fed back)."""
    response = httpx.post(f"{server.http_url}/v1/completions", timeout=60,
                          json={"model": DEFAULT_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    return usage["prompt_tokens"] + usage["completion_tokens"] - 1


def test_top_json_and_load_plot(server, capsys, tmp_path):
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    tokens = _complete(server, "The quick brown fox", 12) + _complete(server, "Once upon a time", 8)
    flags = ["--url", server.http_url, "--token", TOKEN]

    assert cli.main(["top", "--once", "--json", "--window-s", "300", *flags]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert set(snap) == FIELDS and snap["url"] == server.http_url
    assert snap["num_layers"] == config["num_hidden_layers"] and snap["num_experts"] == config["num_local_experts"]
    assert snap["num_groups"] == 2 and isinstance(snap["plan_version"], int) and snap["router"]["step"] > 0
    top_k = config["num_experts_per_tok"]
    assert snap["tokens_per_layer"] == [top_k * tokens] * snap["num_layers"]
    assert [sum(row) for row in snap["load"]] == snap["tokens_per_layer"]
    assert [sum(row) for row in snap["group_load"]] == pytest.approx(snap["tokens_per_layer"])
    assert len(snap["imbalance"]["per_layer"]) == snap["num_layers"] and snap["imbalance"]["worst"] >= 1.0
    assert snap["throughput"]["tokens_per_s"] > 0 and snap["window_steps"] > 0
    assert snap["autoscaler"]["enabled"] and snap["autoscaler"]["phase"] in ("watching", "rebalancing", "cooldown")

    assert cli.main(["top", "--once", *flags]) == 0
    assert f"plan v{snap['plan_version']}" in capsys.readouterr().out

    dump, png = tmp_path / "load.jsonl", tmp_path / "load.png"
    assert cli.main(["load", "dump", "--out", str(dump), "--count", "2", "--interval-s", "0.1", *flags]) == 0
    assert cli.main(["load", "plot", "--from", str(dump), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(png).shape[:2] == (1000, 1200)
