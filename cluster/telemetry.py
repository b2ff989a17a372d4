"""OpenTelemetry traces and metrics: a span per request (GenAI attributes, phases as children, W3C
context in) and the GenAI request metrics, both through the SDK.

Set-up follows the standard variables, read in every process that makes spans (the ingress
replicas, the autoscaler):

    OTEL_TRACES_EXPORTER         otlp | console | none, comma-separated (default: otlp when an OTLP
                                 endpoint is set, else none — no tracing, no cost)
    OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT   where OTLP goes (http/protobuf)
    OTEL_METRICS_EXPORTER        otlp | console | none (default: otlp when an OTLP endpoint is set);
                                 Prometheus needs no exporter: /metrics is on the metrics port
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, OTEL_METRIC_EXPORT_INTERVAL   as the SDK reads them
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*   as the SDK reads them

`moeray serve` hands every `OTEL_*` variable of its own environment to the actors it starts.

A request's span (kind SERVER, named "{operation} {model}", child of the client's `traceparent`
when the HTTP headers or gRPC metadata carry one) has the GenAI semantic-convention attributes
(`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.*`, `gen_ai.response.*`,
`gen_ai.usage.*`) and vLLM's latency attributes (`gen_ai.latency.time_to_first_token`,
`gen_ai.latency.time_in_queue`, `gen_ai.latency.e2e`). Its children: `queue` (arrival at the router
to first scheduled), `prefill` (to the first token) and `decode` (to the last token, its step count
as `moeray.decode.steps`), under which sampled `decode_step` spans (every 8th step: a span per step
would cost more than the step) run from one streamed item to the next. Migrations get spans from the autoscaler (`migration`, staging start to activation).

Metrics, recorded per request by the ingress (so they are the latencies clients see), with the
semantic conventions' names and attributes (`gen_ai.operation.name`, `gen_ai.request.model`,
`gen_ai.provider.name`, `error.type` on failures): histograms `gen_ai.server.request.duration`,
`gen_ai.server.time_to_first_token`, `gen_ai.server.time_per_output_token` (seconds) and
`gen_ai.client.token.usage` (tokens, `gen_ai.token.type` = input | output).
"""

import os
import time

from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode

PROVIDER_NAME = "moeray"
DECODE_STEP_SAMPLE = 8  # one decode step in this many gets a span of its own (the 1st, 9th, 17th, ...)
EXPORTERS = ("otlp", "console", "none")
_provider = None  # one per process


def exporter_names(env=os.environ, signal: str = "TRACES") -> list[str]:
    """The exporters OTEL_{signal}_EXPORTER asks for (signal TRACES or METRICS); ValueError naming
    an unknown one."""
    variable = f"OTEL_{signal}_EXPORTER"
    raw = env.get(variable)
    if raw is None:
        endpoint = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    known = EXPORTERS + (("prometheus",) if signal == "METRICS" else ())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{variable}={raw!r}: unknown exporter {unknown[0]!r} (moeray supports "
                         f"{', '.join(known)})")
    return [n for n in names if n not in ("none", "prometheus")]  # prometheus: the metrics port serves it


_meter_provider = None  # one per process


def request_metrics(env=os.environ) -> "RequestMetrics | None":
    """This process's request metrics, set up once from OTEL_METRICS_EXPORTER; None when off."""
    global _meter_provider
    if _meter_provider is None:
        names = exporter_names(env, "METRICS")
        _meter_provider = _make_meter_provider(names, env) if names else False
    return RequestMetrics(_meter_provider.get_meter("moeray")) if _meter_provider else None


def _make_meter_provider(names: list[str], env):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    readers = []
    for name in names:
        if name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    return MeterProvider(metric_readers=readers,
                         resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "moeray")}))


class RequestMetrics:
    """The GenAI semantic-convention request metrics (see the module docstring)."""

    def __init__(self, meter):
        self.duration = meter.create_histogram("gen_ai.server.request.duration", unit="s",
                                               description="time from request to its last token")
        self.ttft = meter.create_histogram("gen_ai.server.time_to_first_token", unit="s",
                                           description="time from request to its first output token")
        self.tpot = meter.create_histogram("gen_ai.server.time_per_output_token", unit="s",
                                           description="time per output token after the first")
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="input and output tokens per request")

    def record(self, attributes: dict, prompt_tokens: int, output_tokens: int, duration_s: float,
               ttft_s: float | None, error: BaseException | None) -> None:
        if error is not None:
            attributes = {**attributes, "error.type": type(error).__name__}
        self.duration.record(duration_s, attributes)
        self.tokens.record(prompt_tokens, {**attributes, "gen_ai.token.type": "input"})
        self.tokens.record(output_tokens, {**attributes, "gen_ai.token.type": "output"})
        if ttft_s is not None:
            self.ttft.record(ttft_s, attributes)
            if output_tokens > 1:
                self.tpot.record((duration_s - ttft_s) / (output_tokens - 1), attributes)


def tracer(env=os.environ) -> "trace.Tracer | None":
    """This process's tracer, set up once from the environment; None when tracing is off."""
    global _provider
    if _provider is None:
        names = exporter_names(env)
        if not names:
            _provider = False
        else:
            _provider = _make_provider(names, env)
    return _provider.get_tracer("moeray") if _provider else None


def _make_provider(names: list[str], env):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "moeray")}))
    for name in names:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            if protocol not in (None, "http/protobuf"):
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: moeray exports OTLP over http/protobuf")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def otel_env(env=os.environ) -> dict[str, str]:
    """The OTEL_* variables to pass to actors (runtime_env), so they trace like this process says."""
    return {k: v for k, v in env.items() if k.startswith("OTEL_")}


class RequestTrace:
    """One request's span (if tracing) and metrics (if exported), fed the router's stream items as
    they pass through the ingress."""

    def __init__(self, tracer_, operation: str, model: str, request_id: str, params, prompt_tokens: int,
                 carrier: dict[str, str], metrics: RequestMetrics | None = None):
        self.tracer, self.metrics, self.start_ns = tracer_, metrics, time.time_ns()
        self.prompt_tokens = prompt_tokens
        self.metric_attributes = {"gen_ai.operation.name": operation, "gen_ai.request.model": model,
                                  "gen_ai.provider.name": PROVIDER_NAME}
        attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER_NAME,
                      "gen_ai.request.model": model, "gen_ai.response.model": model, "gen_ai.response.id": request_id,
                      "gen_ai.request.max_tokens": params.max_tokens, "gen_ai.request.temperature": params.temperature,
                      "gen_ai.request.top_p": params.top_p, "gen_ai.usage.input_tokens": prompt_tokens}
        if params.top_k:
            attributes["gen_ai.request.top_k"] = params.top_k
        if params.seed is not None:
            attributes["gen_ai.request.seed"] = params.seed
        self.span = tracer_.start_span(f"{operation} {model}", context=extract(carrier), kind=SpanKind.SERVER,
                                       attributes=attributes, start_time=self.start_ns) if tracer_ else None
        self.output_tokens, self.items, self.first_ns, self.finish_reason = 0, 0, None, None
        self.timing: dict | None = None
        self.decode_items: list[tuple[int, int]] = []  # (arrival ns, tokens) of each item after the first

    def item(self, item: dict) -> None:
        now = time.time_ns()
        self.items += 1
        if item["token_ids"] and self.first_ns is not None and self.tracer is not None:
            self.decode_items.append((now, len(item["token_ids"])))
        if item["token_ids"] and self.first_ns is None:
            self.first_ns, self.timing = now, item.get("timing")
        self.output_tokens += len(item["token_ids"])
        if item["finished"]:
            self.finish_reason = item["finish_reason"]

    def end(self, error: BaseException | None = None) -> None:
        end_ns = time.time_ns()
        if self.metrics is not None:
            ttft = (self.first_ns - self.start_ns) / 1e9 if self.first_ns is not None else None
            self.metrics.record(self.metric_attributes, self.prompt_tokens, self.output_tokens,
                                (end_ns - self.start_ns) / 1e9, ttft, error)
        span = self.span
        if span is None:
            return
        span.set_attribute("gen_ai.usage.output_tokens", self.output_tokens)
        span.set_attribute("gen_ai.latency.e2e", (end_ns - self.start_ns) / 1e9)
        if self.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [self.finish_reason])
        if self.first_ns is not None:
            span.set_attribute("gen_ai.latency.time_to_first_token", (self.first_ns - self.start_ns) / 1e9)
            self._phases(end_ns)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end(end_time=end_ns)

    def _phases(self, end_ns: int) -> None:
        """queue / prefill / decode children; the router's clock gives the queue/prefill split."""
        context = trace.set_span_in_context(self.span)
        queue_ns = int(1e9 * (self.timing or {}).get("queue_s", 0.0))
        queued_until = min(self.start_ns + queue_ns, self.first_ns)
        self.span.set_attribute("gen_ai.latency.time_in_queue", (queued_until - self.start_ns) / 1e9)
        for name, start, end, extra in (("queue", self.start_ns, queued_until, {}),
                                        ("prefill", queued_until, self.first_ns, {})):
            self.tracer.start_span(name, context=context, start_time=start, attributes=extra).end(end_time=end)
        decode = self.tracer.start_span("decode", context=context, start_time=self.first_ns, attributes={
            "moeray.decode.steps": len(self.decode_items), "gen_ai.usage.output_tokens": self.output_tokens})
        steps = trace.set_span_in_context(decode)
        previous = self.first_ns
        for index, (arrived, tokens) in enumerate(self.decode_items):  # every DECODE_STEP_SAMPLE-th step
            if index % DECODE_STEP_SAMPLE == 0:
                self.tracer.start_span("decode_step", context=steps, start_time=previous, attributes={
                    "moeray.decode.step": index + 1, "moeray.decode.tokens": tokens}).end(end_time=arrived)
            previous = arrived
        decode.end(end_time=end_ns)
