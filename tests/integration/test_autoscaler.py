"""The placement autoscaler in a real server: a skewed model under load gets rebalanced while it serves.

The checkpoint is the built-in model with its gates pushed towards experts 0 and 1 (tests/skewed.py),
both of which the default plan puts in group 0. Under concurrent streaming load (the real `openai`
client) the autoscaler must replicate or move them so that imbalance falls below the policy's
trigger, every request must succeed, and every greedy output must equal the in-process engine's
(placement changes which group computes a row, never the result). Policy edits on disk take effect;
a broken edit is rejected and the last good policy stays. The admin API needs its token.
"""

import contextlib
import threading
import time

import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from moeray.actors.engine import Engine
from moeray.actors.sequence import SamplingParams
from moeray.cluster import cli
from moeray.cluster.server import start
from moeray.cluster.serving import ServingSpec
from moeray.models import load_model
from moeray.models.tokenizer import Tokenizer
from test_serve_http import free_port
from skewed import PROMPTS, write_skewed_default

TOKEN = "test-admin-token"
POLICY = """\
interval_s: 0.5
load: {window_s: 4, min_tokens_per_layer: 64}
trigger: {imbalance: 1.25, stabilization_s: 1, cooldown_s: 600}
target: {imbalance: 1.1}
replication: {redundant_slots_per_group: 1, max_replicas_per_expert: 2}
budget: {max_experts_per_round: 2, round_spacing_s: 0.5}
"""


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    return write_skewed_default(tmp_path_factory.mktemp("skewed"))


@pytest.fixture(scope="module")
def server(ray_cluster, skewed, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(POLICY)
    server = start(ServingSpec(model=str(skewed), http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                               policy=str(policy), admin_token=TOKEN, kv_cache_bytes=16 << 20), log=lambda message: None)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(server):
    with httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


def _reference(path) -> dict[str, str]:
    tokenizer = Tokenizer(path)
    engine = Engine(load_model(path), tokenizer)
    return {p: engine.generate([tokenizer.encode(p)], SamplingParams(max_tokens=24))[0].text for p in PROMPTS}


def test_admin_api_needs_its_token_and_moves_expert_copies(server, admin, capsys):
    """Runs first, before any traffic: the plan is still the default [[0 1 2 3 4] [4 5 6 7 0]] per layer."""
    assert httpx.get(f"{server.http_url}/admin/placement").status_code == 401
    wrong = httpx.get(f"{server.http_url}/admin/placement", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["error"]["message"]
    plan = admin.get("/admin/placement").json()["plan"]
    assert plan["physical_to_logical"][3] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]
    version = plan["version"]

    full = admin.post("/admin/migrate", json={"layer": 3, "expert": 1, "to_group": 1})
    assert full.status_code == 400 and "group 1 has no free slot in MoE layer 3" in full.json()["error"]["message"]
    assert admin.post("/admin/migrate", json={"layer": 3, "expert": 99, "to_group": 1}).status_code == 400
    assert admin.post("/admin/migrate", json={"layer": "three"}).status_code == 400
    only = admin.post("/admin/migrate", json={"layer": 3, "expert": 5, "from_group": 1})
    assert only.status_code == 400 and "the only copy of expert 5" in only.json()["error"]["message"]

    assert cli.main(["placement", "migrate", "--layer", "3", "--expert", "4", "--from-group", "1",
                     "--url", server.http_url, "--token", TOKEN]) == 0
    _wait_for(lambda: admin.get("/admin/placement").json()["plan"]["version"] == version + 1)
    replicated = admin.post("/admin/migrate", json={"layer": 3, "expert": 1, "to_group": 1})
    assert replicated.status_code == 200 and replicated.json()["new_version"] == version + 2
    _wait_for(lambda: admin.get("/admin/placement").json()["plan"]["version"] == version + 2)
    assert admin.get("/admin/placement").json()["plan"]["physical_to_logical"][3] == [[0, 1, 2, 3, 4], [1, 5, 6, 7, 0]]
    capsys.readouterr()
    assert cli.main(["placement", "show", "--url", server.http_url, "--token", TOKEN]) == 0
    assert f"plan v{version + 2}: 2 groups x 5 slots, 4 MoE layers" in capsys.readouterr().out


def test_policy_apply_cli(server, admin, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(POLICY.replace("max_experts_per_round: 2", "max_experts_per_round: 3"))
    assert cli.main(["policy", "apply", str(good), "--url", server.http_url, "--token", TOKEN]) == 0
    assert admin.get("/admin/policy").json()["policy"]["budget"]["max_experts_per_round"] == 3
    unfit = tmp_path / "unfit.yaml"
    unfit.write_text(POLICY + "pinned:\n  - {expert: 42, group: 0}\n")
    assert cli.main(["policy", "apply", str(unfit), "--url", server.http_url, "--token", TOKEN]) == 2
    assert f"{unfit}:8: pinned.0.expert: expert 42 does not exist (the model has 8)" in capsys.readouterr().err
    assert admin.get("/admin/policy").json()["policy"]["budget"]["max_experts_per_round"] == 3
    assert cli.main(["policy", "apply", str(good), "--url", server.http_url, "--token", "wrong"]) == 2
    assert "Bearer" in capsys.readouterr().err
    assert cli.main(["policy", "apply", str(tmp_path / "missing.yaml"),
                     "--url", server.http_url, "--token", TOKEN]) == 2
    restore = tmp_path / "restore.yaml"
    restore.write_text(POLICY)
    assert cli.main(["policy", "apply", str(restore), "--url", server.http_url, "--token", TOKEN]) == 0


def test_skewed_load_is_rebalanced_while_serving_with_unchanged_outputs(server, admin, skewed):
    expected = _reference(skewed)
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    results, failures = [], []
    stop = threading.Event()

    def worker(offset: int) -> None:
        i = offset
        while not stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            try:
                stream = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=24,
                                                   temperature=0, stream=True)
                results.append((prompt, "".join(chunk.choices[0].text for chunk in stream if chunk.choices)))
            except Exception as err:  # counted, and the test fails on any
                failures.append(f"{prompt!r}: {type(err).__name__}: {err}")
            i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(1)
            status = admin.get("/admin/autoscaler").json()["status"]
            if status["migrations"]["success"] >= 1 and status["phase"] == "cooldown":
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
    status = admin.get("/admin/autoscaler", params={"limit": 256}).json()
    rounds = [d for d in status["history"] if d["action"] == "migrate" and d["reason"].startswith("rebalance")]
    assert rounds, status["history"][-5:]
    assert rounds[0]["imbalance"] > 1.25  # the skew was real: the first round saw it
    assert status["status"]["migrations"]["failed"] == 0
    plan = admin.get("/admin/placement").json()["plan"]
    assert plan["version"] >= rounds[-1]["new_version"]
    # the rebalance ended with every layer under the trigger, on the load the autoscaler saw
    done = [d for d in status["history"] if d["action"] == "done"]
    assert done and done[-1]["imbalance"] <= 1.25, done[-1:]
    metrics = {(s.name, s.labels.get("result") or s.labels.get("action")): s.value
               for family in text_string_to_metric_families(httpx.get(server.metrics_url, timeout=30).text)
               for s in family.samples}
    assert metrics[("moeray_migrations_total", "success")] >= len(rounds)
    assert metrics[("moeray_autoscaler_decisions_total", "migrate")] >= len(rounds)
    assert metrics[("moeray_placement_version", None)] == plan["version"]
    stats = admin.get("/admin/stats", params={"window_s": 60}).json()
    assert stats["throughput"]["tokens_per_s"] > 0 and stats["router"]["plan_version"] == plan["version"]
    assert failures == []
    assert len(results) >= len(PROMPTS)
    wrong = [(p, text, expected[p]) for p, text in results if text != expected[p]]
    assert wrong == []


def test_policy_file_edits_apply_and_broken_edits_are_rejected(server, admin):
    policy_path = server.spec.policy
    before = admin.get("/admin/policy").json()
    edited = POLICY.replace("cooldown_s: 600", "cooldown_s: 700")
    with open(policy_path, "w") as f:
        f.write(edited)
    _wait_for(lambda: admin.get("/admin/policy").json()["policy"]["trigger"]["cooldown_s"] == 700)
    after = admin.get("/admin/policy").json()
    assert after["reloads"]["success"] == before["reloads"]["success"] + 1
    with open(policy_path, "w") as f:
        f.write(edited + "budgt: {max_experts_per_round: 1}\n")
    _wait_for(lambda: admin.get("/admin/policy").json()["reloads"]["rejected"] == before["reloads"]["rejected"] + 1)
    rejected = admin.get("/admin/policy").json()
    assert rejected["policy"] == after["policy"]  # the last good one stays
    assert f"{policy_path}:7: budgt: Extra inputs are not permitted" in rejected["reloads"]["last_error"]


def _wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.3)


def test_moeray_scale_resizes_the_pool_of_a_running_server(server, admin, skewed):
    expected = _reference(skewed)
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert cli.main(["scale", "--expert-groups", "3", "--wait", "--url", server.http_url, "--token", TOKEN]) == 0
    plan = admin.get("/admin/placement").json()["plan"]
    assert plan["num_groups"] == 3 and len(server.deployment.groups) == 3
    prompt = PROMPTS[0]
    text = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert text == expected[prompt]
    assert cli.main(["scale", "--expert-groups", "2", "--wait", "--url", server.http_url, "--token", TOKEN]) == 0
    assert admin.get("/admin/placement").json()["plan"]["num_groups"] == 2
    text = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert text == expected[prompt]
    status = admin.get("/admin/autoscaler").json()["status"]
    assert status["scaling"]["result"] == "done" and status["scaling"]["target"] == 2
    for body, message in (({"expert_groups": 0}, "cannot scale to 0 expert groups"),
                          ({"expert_groups": 9}, "the model has 8 experts per layer"),
                          ({"expert_groups": "3"}, "with N an integer")):
        refused = admin.post("/admin/scale", json=body)
        assert refused.status_code == 400 and message in refused.json()["error"]["message"], refused.text
    with hogging_memory():  # the cluster cannot place one more group: refused at once, by resource name
        refused = admin.post("/admin/scale", json={"expert_groups": 3})
    assert refused.status_code == 400, refused.text
    assert "cannot scale to 3 expert groups: 1 more expert group(s) need" in refused.json()["error"]["message"]
    assert "of resource 'memory'" in refused.json()["error"]["message"]
    assert admin.get("/admin/autoscaler").json()["status"]["scaling"]["target"] == 2  # nothing was queued


@contextlib.contextmanager
def hogging_memory(leave_bytes: int = 1 << 20):
    """An idle actor holding all but `leave_bytes` of the cluster's free Ray 'memory' resource."""
    @ray.remote(num_cpus=0)
    class Hog:
        pass

    hog = Hog.options(memory=int(ray.available_resources()["memory"]) - leave_bytes).remote()
    ray.get(hog.__ray_ready__.remote())
    try:
        yield
    finally:
        ray.kill(hog)
