"""`moeray serve` as a user runs it (a subprocess, Ctrl-C to stop), and overload answered with 429."""

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import httpx
import pytest

from moeray.cluster.server import DEFAULT_MODEL_NAME, start
from moeray.cluster.serving import ServingSpec
from test_serve_http import free_port


def test_moeray_serve_starts_answers_and_stops_cleanly_on_ctrl_c():
    http_port, grpc_port = free_port(), free_port()
    ray_dir = tempfile.mkdtemp(prefix="mr-", dir="/tmp")  # its own Ray; short: socket paths are length-limited
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": ray_dir}
    proc = subprocess.Popen(["moeray", "serve", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
                             "--metrics-port", str(free_port()), "--expert-groups", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once everything listens
        if f"OpenAI HTTP http://127.0.0.1:{http_port}/v1" not in line:
            proc.wait(timeout=30)
            pytest.fail(f"moeray serve did not start: {line!r} {proc.stderr.read()}")
        models = httpx.get(f"http://127.0.0.1:{http_port}/v1/models", timeout=30).json()
        assert models["data"][0]["id"] == DEFAULT_MODEL_NAME
        out = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", timeout=60,
                         json={"prompt": "The for statement", "max_tokens": 8, "temperature": 0}).json()
        assert out["choices"][0]["text"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read()
    shutil.rmtree(ray_dir, ignore_errors=True)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5)


def test_port_in_use_is_named(ray_cluster):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        busy.listen()
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is already in use"):
            start(ServingSpec(http_port=port, grpc_port=free_port(), metrics_port=free_port()), log=lambda m: None)


def test_a_full_queue_answers_429_and_the_server_recovers(ray_cluster):
    server = start(ServingSpec(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), max_num_seqs=1,
                               max_queued_requests=1, expert_groups=1), log=lambda m: None)
    try:
        url = f"{server.http_url}/v1/completions"
        body = {"prompt": "The for statement", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(httpx.post(url, json=body, timeout=120).status_code))
                   for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.3)
        for t in threads:
            t.join(timeout=120)
        assert 429 in statuses and 200 in statuses, statuses
        assert httpx.post(url, json={**body, "max_tokens": 2}, timeout=60).status_code == 200
    finally:
        server.stop()
