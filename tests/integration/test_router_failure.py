"""The router SIGKILLed mid-stream: Ray restarts its process, the deployment loads it with the
groups' plan and re-forms the world, and the ingress resubmits every open request with what its
client already has — so every stream (OpenAI HTTP and KServe gRPC) goes on to the same text the
in-process engine gives, with no token missing or repeated, and no request fails."""

import json
import os
import queue
import signal
import threading
import time

import numpy as np
import openai
import pytest
import ray
import tritonclient.grpc as grpcclient

from moeray.actors.engine import Engine
from moeray.actors.sequence import SamplingParams
from moeray.cluster.server import DEFAULT_MODEL_NAME, start
from moeray.cluster.serving import ServingSpec
from moeray.models import DEFAULT_MODEL_DIR, load_model
from moeray.models.tokenizer import Tokenizer
from test_serve_http import free_port

PROMPTS = ["The for statement", "A list comprehension", "def main():", "Exceptions are", "import os",
           "The while loop", "Dictionaries map", "class Point:"]
MAX_TOKENS = 48


class HttpStreams:
    """Closed-loop streaming completions over HTTP (`openai`): (prompt, text) or the error, per request."""

    def __init__(self, url: str, clients: int = 4):
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=180)
        self.results: list[tuple[str, str]] = []
        self.spans: list[tuple[float, float]] = []  # (first token, end) of each completed request
        self.failures: list[str] = []
        self.open = 0  # streams that have had a token and are not done
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            prompt, pieces, first = PROMPTS[i % len(PROMPTS)], [], None
            try:
                for chunk in self.client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt,
                                                            max_tokens=MAX_TOKENS, temperature=0, stream=True):
                    if not pieces:
                        self.open, first = self.open + 1, time.monotonic()
                    pieces.append(chunk.choices[0].text)
                self.results.append((prompt, "".join(pieces)))
                self.spans.append((first, time.monotonic()))
            except Exception as err:  # counted; the test fails on any
                self.failures.append(f"{prompt!r}: {type(err).__name__}: {err}")
            finally:
                self.open -= bool(pieces)
            i += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=240)


def grpc_stream(target: str, prompt: str, out: queue.Queue) -> None:
    """One streaming KServe request (`tritonclient`): puts (text, error) when it ends."""
    pieces, done = [], threading.Event()
    client = grpcclient.InferenceServerClient(target)

    def callback(result, error):
        if error is not None:
            out.put((None, str(error)))
            done.set()
            return
        pieces.append(result.as_numpy("text_output")[0].decode())
        if result.get_response().parameters["triton_final_response"].bool_param:
            out.put(("".join(pieces), None))
            done.set()

    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    stream = grpcclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([json.dumps({"max_tokens": MAX_TOKENS, "temperature": 0}).encode()],
                                          dtype=np.object_))
    client.start_stream(callback=callback)
    try:
        client.async_stream_infer(DEFAULT_MODEL_NAME, [text, stream, sampling], request_id="grpc")
        if not done.wait(timeout=180):
            out.put((None, "no final response within 180 s"))
    finally:
        client.stop_stream()
        client.close()


@pytest.fixture(scope="module")
def expected():
    tokenizer = Tokenizer(DEFAULT_MODEL_DIR)
    engine = Engine(load_model(DEFAULT_MODEL_DIR), tokenizer)
    params = SamplingParams(max_tokens=MAX_TOKENS)
    return {p: engine.generate([tokenizer.encode(p)], params)[0].text for p in PROMPTS}


def test_router_killed_mid_stream_streams_go_on_unchanged(ray_cluster, expected):
    log: list[str] = []
    server = start(ServingSpec(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                               kv_cache_bytes=16 << 20), log=log.append)
    try:
        router = server.deployment.router
        streams = HttpStreams(server.http_url)
        grpc_out: queue.Queue = queue.Queue()
        try:
            while len(streams.results) < 4 or streams.open < 2:  # warm, and streams open mid-generation
                time.sleep(0.05)
            grpc_thread = threading.Thread(target=grpc_stream, args=(server.grpc_target, PROMPTS[0], grpc_out))
            grpc_thread.start()
            time.sleep(0.3)  # the gRPC stream is under way too
            old_pid = ray.get(router.pid.remote())
            done_before = len(streams.results)
            os.kill(old_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline and len(streams.results) < done_before + 12:
                time.sleep(0.2)
            grpc_thread.join(timeout=180)
        finally:
            streams.stop()
        assert ray.get(router.pid.remote()) != old_pid  # really a new process
        assert ray.get(router.state.remote()) == "serving"
        recoveries = server.deployment.recoveries["router"]
        metrics = _scrape(server.metrics_url)
    finally:
        server.stop()
    assert streams.failures == [], (streams.failures, log)
    assert len(streams.results) >= done_before + 12, log
    assert any(first < killed_at < end for first, end in streams.spans)  # streams that spanned the kill
    wrong = [(p, text) for p, text in streams.results if text != expected[p]]
    assert wrong == [], [(text, expected[p]) for p, text in wrong]
    assert grpc_out.get(timeout=1) == (expected[PROMPTS[0]], None)
    assert recoveries["count"] == 1 and recoveries["last_s"] < 60, recoveries
    assert any(line.startswith("router back in service") for line in log), log
    assert 'moeray_recoveries_total{kind="router",model_name="moeray-default"} 1.0' in metrics


def _scrape(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text
