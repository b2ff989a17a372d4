"""Tracing set-up from OTEL_* variables and the request span, into an in-memory exporter."""

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moeray.actors.sequence import SamplingParams
from moeray.cluster.telemetry import RequestTrace, exporter_names, otel_env


@pytest.mark.parametrize("env, names", [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, []),
])
def test_exporters_follow_the_standard_variables(env, names):
    assert exporter_names(env) == names


def test_an_unknown_exporter_is_named():
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin': unknown exporter 'zipkin'"):
        exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_only_otel_variables_travel_to_actors():
    assert otel_env({"OTEL_SERVICE_NAME": "s", "HOME": "/root"}) == {"OTEL_SERVICE_NAME": "s"}


def test_request_span_phases_and_attributes():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    params = SamplingParams(max_tokens=3, temperature=0.5, top_k=5, seed=7)
    trace = RequestTrace(provider.get_tracer("t"), "chat", "m", "chatcmpl-1", params, prompt_tokens=4,
                         carrier={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    trace.item({"token_ids": [1], "finished": False, "finish_reason": None, "timing": {"queue_s": 0.0}})
    trace.item({"token_ids": [2, 3], "finished": True, "finish_reason": "length"})
    trace.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["chat m"]
    assert format(root.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert root.attributes["gen_ai.request.top_k"] == 5 and root.attributes["gen_ai.request.seed"] == 7
    assert root.attributes["gen_ai.usage.output_tokens"] == 3
    assert root.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert {"queue", "prefill", "decode"} <= set(spans)
    assert all(spans[p].parent.span_id == root.context.span_id for p in ("queue", "prefill", "decode"))
    assert spans["decode"].attributes["moeray.decode.steps"] == 1
    assert spans["decode_step"].parent.span_id == spans["decode"].context.span_id
    assert spans["decode_step"].attributes["moeray.decode.tokens"] == 2


def test_a_failed_request_marks_the_span():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace = RequestTrace(provider.get_tracer("t"), "text_completion", "m", "r", SamplingParams(), 2, {})
    trace.end(RuntimeError("router step failed"))
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code.name == "ERROR" and "router step failed" in span.status.description
    assert "gen_ai.latency.time_to_first_token" not in span.attributes


def test_request_metrics_follow_the_genai_conventions():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from moeray.cluster.telemetry import RequestMetrics

    reader = InMemoryMetricReader()
    metrics = RequestMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"))
    trace = RequestTrace(None, "text_completion", "m", "r", SamplingParams(), 4, {}, metrics)
    trace.item({"token_ids": [1], "finished": False, "finish_reason": None})
    trace.item({"token_ids": [2, 3], "finished": True, "finish_reason": "length"})
    trace.end()
    RequestTrace(None, "chat", "m", "r2", SamplingParams(), 2, {}, metrics).end(RuntimeError("boom"))
    points = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    points[(metric.name, tuple(sorted(point.attributes.items())))] = point
    ok = (("gen_ai.operation.name", "text_completion"), ("gen_ai.provider.name", "moeray"), ("gen_ai.request.model", "m"))
    assert points[("gen_ai.server.request.duration", ok)].count == 1
    assert points[("gen_ai.server.time_to_first_token", ok)].count == 1
    assert points[("gen_ai.server.time_per_output_token", ok)].count == 1
    assert points[("gen_ai.client.token.usage", tuple(sorted(ok + (("gen_ai.token.type", "output"),))))].sum == 3
    assert points[("gen_ai.client.token.usage", tuple(sorted(ok + (("gen_ai.token.type", "input"),))))].sum == 4
    failed = (("error.type", "RuntimeError"), ("gen_ai.operation.name", "chat"), ("gen_ai.provider.name", "moeray"),
              ("gen_ai.request.model", "m"))
    assert points[("gen_ai.server.request.duration", failed)].count == 1
    assert ("gen_ai.server.time_to_first_token", failed) not in points  # no token came


def test_metrics_exporters_follow_the_standard_variables():
    assert exporter_names({"OTEL_METRICS_EXPORTER": "prometheus,otlp"}, "METRICS") == ["otlp"]
    assert exporter_names({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://x"}, "METRICS") == ["otlp"]
    with pytest.raises(ValueError, match="OTEL_METRICS_EXPORTER='statsd'"):
        exporter_names({"OTEL_METRICS_EXPORTER": "statsd"}, "METRICS")


def test_decode_steps_are_sampled():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace = RequestTrace(provider.get_tracer("t"), "chat", "m", "r", SamplingParams(max_tokens=20), 1, {})
    for i in range(20):
        trace.item({"token_ids": [i], "finished": i == 19, "finish_reason": "length" if i == 19 else None})
    trace.end()
    steps = [s.attributes["moeray.decode.step"] for s in exporter.get_finished_spans() if s.name == "decode_step"]
    assert steps == [1, 9, 17]  # 19 decode steps after the first token, every 8th traced
