"""`Controller`: load snapshots in, migration rounds out — the policy, the trigger and the planner together.

No Ray here: `AutoscalerController` (controller_actor.py) feeds it a snapshot and the active
plan every `policy.interval_s` and stages what it returns. Every call yields a `Decision` with its
reason, whether or not anything moves, so operators can see why the autoscaler did nothing too.
"""

import time
from dataclasses import asdict, dataclass, field

import torch

from moeray.actors.load import LoadSnapshot
from moeray.actors.placement import PlacementPlan
from moeray.autoscaler import planner
from moeray.autoscaler.policy import Policy, limits, topology
from moeray.autoscaler.trigger import TriggerState, evaluate, finish


@dataclass(frozen=True)
class Decision:
    time: float  # wall clock, for people
    action: str  # "hold" | "migrate" | "dry_run" | "done"
    reason: str
    plan_version: int  # active when decided
    imbalance: float  # worst layer's, on the load the decision saw
    new_version: int | None = None
    imbalance_after: float | None = None  # predicted on the same load
    moves: list[dict] = field(default_factory=list)
    bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class Controller:
    def __init__(self, policy: Policy, bytes_per_expert: int, group_nodes: list[int]):
        self.policy, self.bytes_per_expert, self.group_nodes = policy, bytes_per_expert, list(group_nodes)
        self.state = TriggerState(phase_since=time.monotonic())

    def set_policy(self, policy: Policy) -> None:
        """A new policy (already validated) applies from the next tick; a rebalance in progress goes on under it."""
        self.policy = policy

    def tick(self, snapshot: LoadSnapshot, plan: PlacementPlan, busy: str | None = None,
             now: float | None = None) -> tuple[Decision, PlacementPlan | None]:
        """One look at the load: (what was decided and why, the plan to stage or None)."""
        now = time.monotonic() if now is None else now
        load = (snapshot.ema if self.policy.load.source == "ema" else snapshot.window).to(torch.float64)  # [L, E]
        imbalance = plan.imbalance(load)  # [L]
        worst = float(imbalance.max())
        tokens = load.sum(1).tolist()  # [L] routed (token, expert) pairs per layer

        def decision(action: str, reason: str, **extra) -> Decision:
            return Decision(time=time.time(), action=action, reason=reason, plan_version=plan.version,
                            imbalance=worst, **extra)

        if busy is not None:
            return decision("hold", busy), None
        verdict = evaluate(self.state, imbalance.tolist(), tokens, self.policy, now)
        self.state = verdict.state
        if not verdict.plan:
            return decision("done" if verdict.done else "hold", verdict.reason), None
        # group_nodes as last known; a pool resized since counts each group as its own node (soft anyway)
        nodes = self.group_nodes if len(self.group_nodes) == plan.num_groups else list(range(plan.num_groups))
        new_plan, moves = planner.plan(load, plan, topology(self.policy, nodes),
                                       limits(self.policy, plan.num_layers, self.bytes_per_expert))
        if not moves:
            self.state = finish(self.state, now, "no move improves balance within the policy").state
            return decision("done", f"{verdict.reason}; no move improves balance within the policy"), None
        after = float(new_plan.imbalance(load).max())
        loads = sum(1 for m in moves if m.new_expert >= 0)
        extra = dict(new_version=new_plan.version, imbalance_after=after, moves=[_move_dict(m) for m in moves],
                     bytes=loads * self.bytes_per_expert)
        if self.policy.dry_run:
            return decision("dry_run", f"{verdict.reason}; dry run: would load {loads} expert(s)", **extra), None
        return decision("migrate", f"{verdict.reason}; loading {loads} expert(s), predicted worst layer "
                                   f"{worst:.2f} -> {after:.2f}", **extra), new_plan


def _move_dict(move) -> dict:
    return {k: getattr(move, k) for k in ("layer", "group", "slot", "old_expert", "new_expert", "kind")}
