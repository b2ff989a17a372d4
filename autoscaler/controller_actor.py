"""`AutoscalerController`: the Ray shell around `Controller` — a timer, the router calls, the history.

Every `policy.interval_s` it reads the router's load snapshot and plan, lets the controller
decide, and stages the plan it gets (`RouterActor.set_plan`: the groups load the new experts
while serving goes on; the router activates it at a step boundary). It keeps the last decisions,
the migrations with their outcome and duration, and policy reloads, for `moeray top`, the admin
API and metrics. A policy is applied only if it validates and fits the running plan; otherwise
the last good one stays and the caller gets every problem as `SOURCE:LINE: field.path: message`.
"""

import collections
import logging
import threading
import time

import ray
import torch

from moeray.actors.load import LoadSnapshot
from moeray.actors.placement import PlacementPlan
from moeray.autoscaler.controller import Controller, Decision
from moeray.autoscaler.manual import manual_migrate
from moeray.autoscaler.policy import check_fits, parse_policy
from moeray.autoscaler.scaler import Scaler
from moeray.autoscaler.scaling import ScalingSnapshot
from moeray.cluster.telemetry import tracer as otel_tracer

log = logging.getLogger("moeray.autoscaler")


@ray.remote(num_cpus=0, max_concurrency=4)
class AutoscalerController:
    def __init__(self, router, policy_text: str, policy_source: str, num_experts: int, bytes_per_expert: int,
                 group_nodes: list[int], group_demand: dict[str, float] | None = None):
        torch.set_num_threads(1)
        self.router, self.num_experts = router, num_experts
        self.lock = threading.Lock()  # one tick, policy change or manual migration at a time
        self.controller = Controller(parse_policy(policy_text, policy_source), bytes_per_expert, group_nodes)
        self.policy_text, self.policy_source = policy_text, policy_source
        self.reloads = {"success": 0, "rejected": 0, "last_success_time": time.time(), "last_error": None}
        self.decisions: collections.deque = collections.deque(maxlen=256)
        self.migrations = {"success": 0, "failed": 0, "last_duration_s": None, "moved_experts": 0}
        self.actions: collections.Counter = collections.Counter()  # decisions by action, since start
        self.pending: tuple[int, float, object] | None = None  # (version, start, span) of the plan being staged
        self.tracer = otel_tracer()  # migration spans, when OTEL_* asks for tracing
        self.scaler = Scaler(len(group_nodes), num_experts, group_demand)  # see Scaler: refuses what cannot be placed
        self.max_num_seqs = ray.get(router.limits.remote())["max_num_seqs"]
        self.last_look = time.time()  # the scaling signals cover the steps since then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="autoscaler", daemon=True)
        self._thread.start()

    def apply_policy(self, text: str, source: str = "<policy>") -> dict:
        """Validate `text` against the schema and the running plan; apply it, or raise and keep the old one."""
        with self.lock:
            try:
                policy = parse_policy(text, source)
                plan = self._plan()
                check_fits(policy, plan.num_layers, plan.num_experts, plan.num_groups,
                           plan.physical_to_logical.tolist(), text, source)
            except ValueError as err:
                self.reloads["rejected"] += 1
                self.reloads["last_error"] = str(err)
                log.warning("policy from %s rejected, the last good one stays:\n%s", source, err)
                raise
            self.controller.set_policy(policy)
            self.policy_text, self.policy_source = text, source
            self.reloads["success"] += 1
            self.reloads["last_success_time"] = time.time()
            log.info("policy from %s applied", source)
            return self.policy()

    def policy(self) -> dict:
        return {"source": self.policy_source, "policy": self.controller.policy.model_dump(mode="json"),
                "text": self.policy_text, "reloads": dict(self.reloads)}

    def history(self, limit: int = 50) -> list[dict]:
        return [d.to_dict() for d in list(self.decisions)[-limit:]]

    def status(self) -> dict:
        """What `moeray top` and the metrics show: phase, migrations, reloads, the last decision."""
        last = self.decisions[-1].to_dict() if self.decisions else None
        return {"phase": self.controller.state.phase, "dry_run": self.controller.policy.dry_run,
                "migrations": dict(self.migrations), "reloads": dict(self.reloads), "last_decision": last,
                "decisions": dict(self.actions),
                "pending_version": self.pending[0] if self.pending else None,
                "scaling": dict(self.scaler.last) if self.scaler.last else None}

    def migrate(self, layer: int, expert: int, to_group: int | None = None, from_group: int | None = None) -> dict:
        """An operator's replicate, move or drop (see `manual_migrate`); staged like any autoscaler round."""
        with self.lock:
            self._settle(ray.get(self.router.stats.remote()))
            if self.pending is not None:
                raise ValueError(f"plan v{self.pending[0]} is still staging; try again when it is active")
            plan = self._plan()
            new_plan = manual_migrate(plan, layer, expert, to_group, from_group)
            kind = "drop" if to_group is None else "move" if from_group is not None else "replicate"
            where = f"from group {from_group}" if to_group is None else f"to group {to_group}"
            decision = Decision(time=time.time(), action="migrate", plan_version=plan.version, imbalance=0.0,
                                reason=f"operator: {kind} expert {expert} of MoE layer {layer} {where}",
                                new_version=new_plan.version,
                                bytes=0 if to_group is None else self.controller.bytes_per_expert,
                                moves=[{"layer": layer, "expert": expert, "to_group": to_group, "from_group": from_group,
                                        "kind": kind, "new_expert": -1 if to_group is None else expert}])
            self._stage(new_plan, decision)
            return decision.to_dict()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.controller.policy.interval_s):
            try:
                with self.lock:
                    self._tick()
            except Exception as err:  # a router that is restarting, say: try again next interval
                log.warning("autoscaler tick failed: %s: %s", type(err).__name__, err)

    def scale(self, groups: int) -> dict:
        """An operator's request (`moeray scale`): queue a resize of the pool to `groups` groups."""
        with self.lock:
            return self.scaler.request(groups, self.controller.policy, f"operator: scale to {groups} expert groups",
                                       ray.available_resources())

    def take_scale_request(self) -> tuple[int, str] | None:
        """For the process that owns the deployment: the resize to do now, if any."""
        with self.lock:
            return self.scaler.take()

    def scale_done(self, num_groups: int, error: str | None) -> None:
        with self.lock:
            target = self.scaler.last["target"]
            self.scaler.done(num_groups, error, time.monotonic())
            action = "scaled" if error is None else "scale_failed"
            self._record(Decision(time=time.time(), action=action, plan_version=self._plan().version, imbalance=0.0,
                                  reason=f"{self.scaler.last['reason']}: now {num_groups} groups"
                                         + (f" (asked {target}): {error}" if error else "")))

    def _tick(self) -> None:
        policy = self.controller.policy
        stats = ray.get(self.router.stats.remote())
        self._settle(stats)
        snapshot = LoadSnapshot.from_dict(ray.get(self.router.load_snapshot.remote(policy.load.window_s)))
        plan = self._plan()
        self.controller.group_nodes = ray.get(self.router.group_nodes.remote())  # resizes and recoveries change it
        busy = f"plan v{stats['staging_version']} is still staging" if stats["staging_version"] is not None else None
        decision, new_plan = self.controller.tick(snapshot, plan, busy or self.scaler.busy)
        if new_plan is not None:
            self._stage(new_plan, decision)
        else:
            self._record(decision)
        if policy.scaling.enabled and not self.scaler.busy:
            self._scaling_look(stats, plan, decision)

    def _scaling_look(self, stats: dict, plan: PlacementPlan, decision: Decision) -> None:
        """The scaling policy's turn: batch occupancy and queue since the last look, and whether
        placement gave up on an imbalanced layer."""
        steps = ray.get(self.router.step_log.remote(self.last_look))
        self.last_look = time.time()
        occupancy = sum(s[4] for s in steps) / len(steps) / self.max_num_seqs if steps else 0.0
        stuck = decision.action == "done" and "no move improves" in decision.reason
        signals = ScalingSnapshot(plan.num_groups, occupancy, stats["waiting"], decision.imbalance, stuck)
        reason = self.scaler.evaluate(signals, self.controller.policy, time.monotonic(), ray.available_resources())
        if reason is not None:
            self._record(Decision(time=time.time(), action="scale", reason=reason, plan_version=plan.version,
                                  imbalance=decision.imbalance))

    def _stage(self, plan: PlacementPlan, decision: Decision) -> None:
        ray.get(self.router.set_plan.remote(plan.to_json()))
        loads = sum(1 for m in decision.moves if m.get("new_expert", 0) >= 0)
        span = self.tracer.start_span("migration", attributes={
            "moeray.plan.version": plan.version, "moeray.migration.reason": decision.reason,
            "moeray.migration.loads": loads}) if self.tracer else None
        self.pending = (plan.version, time.monotonic(), span)
        self.migrations["moved_experts"] += loads
        self._record(decision)

    def _settle(self, stats: dict) -> None:
        """Close the books on the staged plan: active (success) or not staged (failed)."""
        if self.pending is None:
            return
        version, start, span = self.pending
        if stats["plan_version"] >= version:
            result = "success"
        elif stats["staging_version"] is None:  # not staged, or the router was restarted and dropped it
            result = "failed"
            why = stats["staging_error"] if stats["staging_error"] and f"v{version}" in stats["staging_error"] \
                else "the router was restarted while it staged"
            log.warning("migration to plan v%d failed: %s", version, why)
        else:
            return
        self.migrations[result] += 1
        self.migrations["last_duration_s"] = time.monotonic() - start
        self.pending = None
        if span is not None:
            span.set_attribute("moeray.migration.result", result)
            span.end()

    def _record(self, decision: Decision) -> None:
        previous = self.decisions[-1] if self.decisions else None
        self.decisions.append(decision)
        self.actions[decision.action] += 1
        if decision.action != "hold" or previous is None or previous.reason.split(":")[0] != decision.reason.split(":")[0]:
            log.info("autoscaler %s (plan v%d): %s", decision.action, decision.plan_version, decision.reason)

    def _plan(self) -> PlacementPlan:
        return PlacementPlan.from_json(ray.get(self.router.plan_json.remote()), self.num_experts)
