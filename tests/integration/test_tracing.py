"""OpenTelemetry traces and metrics from a real server to a real OTLP/HTTP receiver on loopback.

The server is started with the standard OTEL_* variables pointing at a tiny OTLP endpoint in this
process (an HTTP server that decodes `ExportTraceServiceRequest` protobufs). Requests carry a W3C
`traceparent` (an HTTP header for the `openai` client, gRPC metadata for `tritonclient`); the
request span must join that trace, carry the GenAI attributes, and have queue / prefill / decode
children; the GenAI request metrics must arrive too.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import openai
import pytest
import tritonclient.grpc as triton
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from moeray.cluster.server import DEFAULT_MODEL_NAME, start
from moeray.cluster.serving import ServingSpec
from test_serve_http import free_port

TRACE_HTTP, TRACE_GRPC = "4bf92f3577b34da6a3ce929d0e0e4736", "0af7651916cd43dd8448eb211c80319c"
PARENT = "00f067aa0ba902b7"


class Receiver(BaseHTTPRequestHandler):
    spans: list = []
    metrics: list = []  # (name, data point) of every export

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["content-length"]))
        if self.path == "/v1/metrics":
            for resource in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        Receiver.metrics += [(metric.name, point) for point in metric.histogram.data_points]
            return self._ok()
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}.get("service.name")
            for scope in resource.scope_spans:
                for span in scope.spans:
                    Receiver.spans.append((service, span))
        self._ok()

    def _ok(self):
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster, receiver):
    settings = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver}/v1/traces",
                "OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{receiver}/v1/metrics",
                "OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "moeray-test"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        server = start(ServingSpec(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                                   expert_groups=1, autoscaler=False), log=lambda m: None)
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    yield server
    server.stop()


def _spans_of(trace_id: str, count: int, timeout_s: float = 30) -> list:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [(svc, s) for svc, s in Receiver.spans if s.trace_id.hex() == trace_id]
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"expected {count} spans of trace {trace_id}, got {len(found)}")


def _attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        value = a.value
        kind = value.WhichOneof("value")
        out[a.key] = [v.string_value for v in value.array_value.values] if kind == "array_value" else getattr(value, kind)
    return out


def test_http_request_span_joins_the_callers_trace_with_genai_attributes(server):
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    completion = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The for statement", max_tokens=6,
                                           temperature=0, extra_headers={"traceparent": f"00-{TRACE_HTTP}-{PARENT}-01"})
    spans = _spans_of(TRACE_HTTP, 4)
    by_name = {s.name: (svc, s) for svc, s in spans}
    service, root = by_name[f"text_completion {DEFAULT_MODEL_NAME}"]
    assert service == "moeray-test" and root.parent_span_id.hex() == PARENT
    assert root.kind == root.SPAN_KIND_SERVER
    attrs = _attrs(root)
    assert attrs["gen_ai.operation.name"] == "text_completion" and attrs["gen_ai.provider.name"] == "moeray"
    assert attrs["gen_ai.request.model"] == DEFAULT_MODEL_NAME and attrs["gen_ai.request.max_tokens"] == 6
    assert attrs["gen_ai.response.id"] == completion.id
    assert attrs["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens == 6
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert 0 < attrs["gen_ai.latency.time_to_first_token"] <= attrs["gen_ai.latency.e2e"]
    for phase in ("queue", "prefill", "decode"):
        _, child = by_name[phase]
        assert child.parent_span_id == root.span_id
        assert root.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano <= root.end_time_unix_nano
    assert by_name["queue"][1].end_time_unix_nano == by_name["prefill"][1].start_time_unix_nano
    assert _attrs(by_name["decode"][1])["moeray.decode.steps"] >= 1


def test_grpc_request_span_takes_traceparent_from_metadata(server):
    client = triton.InferenceServerClient(server.grpc_target)
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"The for statement"], dtype=object))
    params = triton.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"max_tokens": 4}).encode()], dtype=object))
    client.infer(DEFAULT_MODEL_NAME, [text, params], headers={"traceparent": f"00-{TRACE_GRPC}-{PARENT}-01"})
    spans = _spans_of(TRACE_GRPC, 4)
    root = next(s for _, s in spans if s.name == f"text_completion {DEFAULT_MODEL_NAME}")
    assert root.parent_span_id.hex() == PARENT and _attrs(root)["gen_ai.usage.output_tokens"] == 4


def test_a_request_without_traceparent_starts_its_own_trace(server):
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    before = len(Receiver.spans)
    client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        roots = [s for _, s in Receiver.spans[before:] if s.name == f"chat {DEFAULT_MODEL_NAME}"]
        if roots:
            break
        time.sleep(0.2)
    assert roots and not roots[0].parent_span_id and _attrs(roots[0])["gen_ai.operation.name"] == "chat"


def test_genai_request_metrics_are_exported(server):
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)
    client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The for statement", max_tokens=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = {name for name, _ in Receiver.metrics}
        if {"gen_ai.server.request.duration", "gen_ai.server.time_to_first_token", "gen_ai.client.token.usage"} <= names:
            break
        time.sleep(0.3)
    durations = [p for name, p in Receiver.metrics if name == "gen_ai.server.request.duration"]
    assert durations and max(p.count for p in durations) >= 1
    attributes = {a.key: a.value.string_value for a in durations[-1].attributes}
    assert attributes["gen_ai.request.model"] == DEFAULT_MODEL_NAME and attributes["gen_ai.provider.name"] == "moeray"
