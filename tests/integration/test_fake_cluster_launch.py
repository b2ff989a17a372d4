"""A real launch on Ray's fake multi-node autoscaler: zero workers -> `moeray serve` -> nodes -> a request.

`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=cluster/launch/fake-multinode.yaml` runs
Ray's real autoscaler with a provider whose "nodes" are extra raylets on this machine. `moeray
serve --group-resource moeray_expert_group=1` makes each expert group ask for a resource only worker
nodes carry, so the autoscaler must add nodes before the groups can start.

The cluster has its own temp dir and ports (the suite's session cluster and other people's Rays
keep running) and is stopped by the process ids this test started — never `ray stop`, which would
kill every Ray on the machine.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from test_serve_http import free_port

ROOT = Path(__file__).resolve().parents[2]
FAKE_CONFIG = ROOT / "cluster" / "launch" / "fake-multinode.yaml"
NUM_GROUPS = 2


@pytest.fixture(scope="module")
def fake_cluster():
    """A fake autoscaling head with no workers; yields (gcs address, its logs dir)."""
    temp_dir = tempfile.mkdtemp(prefix="mrf-", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs_port = free_port()
    config = yaml.safe_load(FAKE_CONFIG.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"  # the fake provider's raylets join this
    config_path = Path(temp_dir) / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "AUTOSCALER_METRIC_PORT": str(free_port())}
    command = ["ray", "start", "--head", "--block", "--num-cpus", "1", "--include-dashboard=false",
               "--disable-usage-stats", "--temp-dir", temp_dir, f"--autoscaling-config={config_path}",
               "--port", str(gcs_port), "--dashboard-port", str(free_port()),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0"]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for(lambda: "Ray runtime started" in (Path(temp_dir) / "head.log").read_text() or head.poll() is not None,
                  60, "the fake head to start")
        assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()
        yield f"127.0.0.1:{gcs_port}", Path(temp_dir) / "session_latest" / "logs"
    finally:
        _stop_tree(head.pid)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_serve_on_an_autoscaling_cluster_adds_nodes_for_expert_groups_and_answers(fake_cluster):
    address, logs = fake_cluster
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": address}
    # --no-autoscaler: the placement autoscaler is not under test here, and one actor fewer suits 2 cores.
    serve = subprocess.Popen(
        ["moeray", "serve", "--address", "auto", "--expert-groups", str(NUM_GROUPS),
         "--group-resource", "moeray_expert_group=1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
         "--metrics-port", str(free_port()), "--no-autoscaler"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = serve.stdout.readline()  # printed once everything listens
        if f"OpenAI HTTP http://127.0.0.1:{http_port}/v1" not in line:
            serve.kill()
            pytest.fail(f"moeray serve did not start: {line!r} {serve.stderr.read()}")

        placed = _probe(address)  # groups need a resource only the autoscaler's nodes carry
        # the autoscaler may overshoot by a node when nodes start slowly; the groups hold exactly NUM_GROUPS units
        assert placed["nodes_with_group_resource"] >= NUM_GROUPS, placed
        assert placed["nodes_with_group_resource"] - placed["group_resource_free"] == NUM_GROUPS, placed
        assert ":event_summary:Adding" in (logs / "monitor.log").read_text()

        body = {"prompt": "The for statement", "max_tokens": 8, "temperature": 0, "stream": True}
        chunks = []
        with httpx.stream("POST", f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            chunks = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        assert chunks[-1] == "[DONE]"
        text = "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1] if json.loads(c)["choices"])
        assert text and len(chunks) > 2, chunks
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            code = serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            raise
    stderr = serve.stderr.read()
    assert "for the cluster to add {'moeray_expert_group': 2.0}" in stderr, stderr  # it started from zero workers
    assert code == 0, stderr


def _probe(address: str) -> dict:
    """Ask the cluster, from a driver of its own, where the group resource is and how much is free."""
    script = (
        "import json, ray\n"
        f"ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "nodes = [n for n in ray.nodes() if n['Alive'] and n['Resources'].get('moeray_expert_group')]\n"
        "print(json.dumps({'nodes_with_group_resource': len(nodes),\n"
        "                  'group_resource_free': ray.available_resources().get('moeray_expert_group', 0)}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _stop_tree(root: int) -> None:
    """SIGTERM `root` and every process under it (fake nodes are the autoscaler's children), then SIGKILL."""
    pids = _descendants(root)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(_is_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
    try:
        os.waitpid(root, 0)  # reap our child
    except ChildProcessError:
        pass


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
