"""Prometheus `/metrics` on the metrics port (8002, Triton's convention): request and MoE metrics.

The exporter runs in the `moeray serve` process; on every scrape it asks the router (one
`RouterActor.metrics()` call) and the autoscaler (`status()`) for their numbers, so nothing is
pushed and nothing goes stale. Request metrics mean what vLLM's do (see actors/request_stats.py);
everything is under the prefix `moeray_`, labelled with `model_name`:

| metric | type | labels |
| --- | --- | --- |
| moeray_time_to_first_token_seconds, moeray_inter_token_latency_seconds, moeray_e2e_request_latency_seconds | histogram | |
| moeray_num_requests_running, moeray_num_requests_waiting | gauge | |
| moeray_prompt_tokens_total, moeray_generation_tokens_total | counter | |
| moeray_request_success_total | counter | finish_reason |
| moeray_computed_tokens_total (tokens the steps ran: every MoE layer routes each one top_k times) | counter | |
| moeray_expert_tokens_total (routed tokens per logical expert since start) | counter | layer, expert |
| moeray_group_load_tokens (tokens per group over the last 60 s, summed over layers) | gauge | group |
| moeray_layer_imbalance (busiest group / mean group over the last 60 s) | gauge | layer |
| moeray_placement_version, moeray_expert_groups | gauge | |
| moeray_expert_replicas (copies of a logical expert) | gauge | layer, expert |
| moeray_client_concentration (the 20 busiest clients) | gauge | client |
| moeray_saturation_flagged_clients | gauge | |
| moeray_migrations_total | counter | result |
| moeray_autoscaler_decisions_total | counter | action |
| moeray_migration_duration_seconds (the last one, staging start to activation) | gauge | |
| moeray_policy_reloads_total | counter | result |
| moeray_policy_last_reload_success_timestamp_seconds | gauge | |
| moeray_recoveries_total (a lost expert group, a restarted router) | counter | kind |
| moeray_recovery_duration_seconds (the last recovery, detection to serving again) | gauge | kind |
| moeray_router_up (0 while a restarted router is brought back) | gauge | |

Series count: with `experts_per_layer = N` the per-expert series keep each layer's N busiest
experts and sum the rest as `expert="other"` (replicas: only experts with more than one copy),
so a 58-layer, 256-expert model stays at a few thousand series.
"""

import threading
from typing import Callable

import ray
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


MAX_CLIENT_SERIES = 20  # per-client series: the busiest clients only, so label sets stay bounded


class MoerayCollector:
    def __init__(self, router, controller, model_name: str, experts_per_layer: int | None = None,
                 recoveries: Callable[[], dict] | None = None):
        self.router, self.controller, self.model_name = router, controller, model_name
        self.experts_per_layer = experts_per_layer
        self.recoveries = recoveries  # `Deployment.recoveries`: {kind: {count, last_s}}

    def collect(self):
        yield from self._recoveries()
        name = [self.model_name]
        try:
            m = ray.get(self.router.metrics.remote(), timeout=30)
        except ray.exceptions.RayError:  # the router is being restarted: say so, and what we know without it
            m = None
        yield _gauge("moeray_router_up", "1 while the router serves, 0 while it is restarted", name, int(m is not None))
        if m is None:
            yield from self._autoscaler()
            return
        req = m["requests"]
        for metric, key, doc in (("time_to_first_token_seconds", "ttft", "arrival to first output token"),
                                 ("inter_token_latency_seconds", "itl", "time per output token after the first"),
                                 ("e2e_request_latency_seconds", "e2e", "arrival to last token")):
            family = HistogramMetricFamily(f"moeray_{metric}", doc, labels=["model_name"])
            family.add_metric(name, _buckets(req[key]), req[key]["sum"])
            yield family
        yield _gauge("moeray_num_requests_running", "requests in the running batch", name, m["running"])
        yield _gauge("moeray_num_requests_waiting", "requests waiting to be scheduled", name, m["waiting"])
        yield _counter("moeray_prompt_tokens", "prompt tokens of admitted requests", name, req["prompt_tokens"])
        yield _counter("moeray_generation_tokens", "generated tokens", name, req["generation_tokens"])
        success = CounterMetricFamily("moeray_request_success", "finished requests", labels=["model_name", "finish_reason"])
        for reason, count in sorted(req["finished"].items()):
            success.add_metric([self.model_name, reason], count)
        yield success
        yield _counter("moeray_computed_tokens", "tokens computed by all steps (prompt chunks and decodes)", name,
                       m["computed_tokens"])
        experts = CounterMetricFamily("moeray_expert_tokens", "routed (token, expert) pairs per logical expert",
                                      labels=["model_name", "layer", "expert"])
        for layer, expert, value in expert_series(m["expert_tokens_total"], self.experts_per_layer):
            experts.add_metric([self.model_name, str(layer), expert], value)
        yield experts
        groups = GaugeMetricFamily("moeray_group_load_tokens", "tokens per expert group over the last 60 s, all layers",
                                   labels=["model_name", "group"])
        for group, value in enumerate(map(sum, zip(*m["group_load"]))):
            groups.add_metric([self.model_name, str(group)], value)
        yield groups
        imbalance = GaugeMetricFamily("moeray_layer_imbalance", "busiest group / mean group over the last 60 s",
                                      labels=["model_name", "layer"])
        for layer, value in enumerate(m["imbalance"]):
            imbalance.add_metric([self.model_name, str(layer)], value)
        yield imbalance
        yield _gauge("moeray_placement_version", "version of the placement plan in force", name, m["plan_version"])
        yield _gauge("moeray_expert_groups", "expert groups in the pool", name, len(m["group_load"][0]))
        replicas = GaugeMetricFamily("moeray_expert_replicas", "copies of a logical expert",
                                     labels=["model_name", "layer", "expert"])
        for layer, counts in enumerate(m["replica_count"]):
            for expert, count in enumerate(counts):
                if self.experts_per_layer is None or count > 1:
                    replicas.add_metric([self.model_name, str(layer), str(expert)], count)
        yield replicas
        yield from self._clients()
        yield from self._autoscaler()

    def _recoveries(self):
        if self.recoveries is None:
            return
        recoveries = self.recoveries()
        total = CounterMetricFamily("moeray_recoveries", "recoveries from a lost expert group or router, by kind",
                                    labels=["model_name", "kind"])
        seconds = GaugeMetricFamily("moeray_recovery_duration_seconds", "the last recovery of each kind, from its "
                                    "detection to serving again", labels=["model_name", "kind"])
        for kind, record in sorted(recoveries.items()):
            total.add_metric([self.model_name, kind], record["count"])
            if record["last_s"] is not None:
                seconds.add_metric([self.model_name, kind], record["last_s"])
        yield total
        yield seconds

    def _clients(self):
        rows = ray.get(self.router.clients.remote(), timeout=30)
        flagged = GaugeMetricFamily("moeray_saturation_flagged_clients", "clients flagged for expert saturation",
                                    labels=["model_name"])
        flagged.add_metric([self.model_name], sum(r["flagged"] for r in rows))
        yield flagged
        scores = GaugeMetricFamily("moeray_client_concentration", "how much more a client's traffic concentrates on "
                                   f"its busiest experts than everyone else's (the {MAX_CLIENT_SERIES} busiest clients)",
                                   labels=["model_name", "client"])
        for row in rows[:MAX_CLIENT_SERIES]:
            scores.add_metric([self.model_name, row["client"]], row["score"])
        yield scores

    def _autoscaler(self):
        if self.controller is None:
            return
        status = ray.get(self.controller.status.remote(), timeout=30)
        name = [self.model_name]
        migrations = CounterMetricFamily("moeray_migrations", "placement migrations by result", labels=["model_name", "result"])
        for result in ("success", "failed"):
            migrations.add_metric([self.model_name, result], status["migrations"][result])
        yield migrations
        if status["migrations"]["last_duration_s"] is not None:
            yield _gauge("moeray_migration_duration_seconds", "the last migration, staging start to activation", name,
                         status["migrations"]["last_duration_s"])
        decisions = CounterMetricFamily("moeray_autoscaler_decisions", "autoscaler decisions by action "
                                        "(hold, migrate, dry_run, done)", labels=["model_name", "action"])
        for action, count in sorted(status["decisions"].items()):
            decisions.add_metric([self.model_name, action], count)
        yield decisions
        reloads = CounterMetricFamily("moeray_policy_reloads", "policy applications by result",
                                      labels=["model_name", "result"])
        reloads.add_metric([self.model_name, "success"], status["reloads"]["success"])
        reloads.add_metric([self.model_name, "rejected"], status["reloads"]["rejected"])
        yield reloads
        yield _gauge("moeray_policy_last_reload_success_timestamp_seconds", "when a policy was last applied", name,
                     status["reloads"]["last_success_time"])


def expert_series(total: list[list[int]], experts_per_layer: int | None) -> list[tuple[int, str, int]]:
    """(layer, expert label, tokens): every expert, or each layer's N busiest plus their sum as "other"."""
    out = []
    for layer, counts in enumerate(total):
        if experts_per_layer is None or experts_per_layer >= len(counts):
            out += [(layer, str(e), c) for e, c in enumerate(counts)]
            continue
        ranked = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
        keep = sorted(ranked[:experts_per_layer])
        out += [(layer, str(e), counts[e]) for e in keep]
        out.append((layer, "other", sum(counts[e] for e in ranked[experts_per_layer:])))
    return out


def serve_metrics(collector: MoerayCollector, host: str, port: int) -> "MetricsServer":
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)


class MetricsServer:
    def __init__(self, server, thread: threading.Thread):
        self.server, self.thread = server, thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _buckets(hist: dict) -> list[tuple[str, int]]:
    cumulative, out = 0, []
    for bound, count in zip(hist["buckets"], hist["counts"]):
        cumulative += count
        out.append((str(float(bound)), cumulative))
    out.append(("+Inf", cumulative + hist["counts"][-1]))
    return out


def _gauge(metric: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(metric, doc, labels=["model_name"])
    family.add_metric(labels, value)
    return family


def _counter(metric: str, doc: str, labels: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(metric, doc, labels=["model_name"])
    family.add_metric(labels, value)
    return family
