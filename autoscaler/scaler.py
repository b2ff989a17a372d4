"""`Scaler`: the expert pool's size — requests (an operator's, or the policy's verdict) and their outcome.

The autoscaler decides *that* the pool should have N groups; the process that owns the deployment
(`moeray serve`) does the resizing (`Deployment.scale_to`), because only it can start and stop
group actors and re-form their world. They meet here: `request` queues a target, the owner
`take`s it, resizes, and reports `done`. One resize at a time; while one is queued or running the
placement controller holds (a migration would race the re-formation).

No Ray: the controller actor holds one and feeds it the router's signals (`evaluate`).
"""

import time

from moeray.autoscaler.policy import Policy
from moeray.autoscaler.scaling import (ScalingSnapshot, ScalingState, check_target, evaluate, record_action,
                                       resource_shortfall)


class Scaler:
    def __init__(self, num_groups: int, num_experts: int, group_demand: dict[str, float] | None = None):
        """`group_demand`: the Ray resources one group asks for, when they are fixed (GPU, or its
        weights' memory) so that a scale-out the cluster cannot place is refused at once; None when
        an autoscaling cluster may add nodes for them (custom `group_resources`)."""
        self.num_groups, self.num_experts, self.group_demand = num_groups, num_experts, group_demand
        self.state = ScalingState()
        self.queued: tuple[int, str] | None = None  # (target groups, why) not yet taken
        self.last: dict | None = None  # {target, reason, result: queued|running|done|failed, error, seconds}
        self._started = 0.0

    @property
    def busy(self) -> str | None:
        """Why placement should wait, or None."""
        if self.last is not None and self.last["result"] in ("queued", "running"):
            return f"scaling to {self.last['target']} expert groups is in progress"
        return None

    def request(self, groups: int, policy: Policy, reason: str, free: dict[str, float] | None = None) -> dict:
        """Queue a resize to `groups`; ValueError (naming the bound, or the missing resources on the
        cluster's `free` ones) when it cannot be done."""
        check_target(groups, policy)
        if groups > self.num_experts:
            raise ValueError(f"cannot scale to {groups} expert groups: the model has {self.num_experts} experts per layer")
        if self.busy:
            raise ValueError(f"{self.busy}; try again when it is done")
        if self.group_demand and free is not None and groups > self.num_groups:
            short = resource_shortfall(self.group_demand, groups - self.num_groups, free)
            if short:
                raise ValueError(f"cannot scale to {groups} expert groups: {short}")
        self.queued = (groups, reason)
        self.last = {"target": groups, "reason": reason, "result": "queued", "error": None, "seconds": None}
        return dict(self.last)

    def take(self) -> tuple[int, str] | None:
        """The owner's turn: the queued target (now running), or None."""
        queued, self.queued = self.queued, None
        if queued is not None:
            self.last["result"], self._started = "running", time.monotonic()
        return queued

    def done(self, num_groups: int, error: str | None, now: float) -> None:
        self.num_groups = num_groups
        self.last.update(result="failed" if error else "done", error=error, seconds=time.monotonic() - self._started)
        self.state = record_action(now)

    def evaluate(self, snapshot: ScalingSnapshot, policy: Policy, now: float,
                 free: dict[str, float] | None = None) -> str | None:
        """The policy's look at the signals; queues its verdict's target. -> the reason when it acts
        (or could not: then the cooldown starts as after an action, so it is not retried every tick)."""
        if self.busy:
            return None
        verdict = evaluate(self.state, snapshot, policy, now)
        self.state = verdict.state
        if verdict.action == "hold":
            return None
        try:
            self.request(verdict.target_groups, policy, f"policy: {verdict.reason}", free)
        except ValueError as err:
            self.state = record_action(now)
            return f"{verdict.action} to {verdict.target_groups} groups refused: {err}"
        return f"{verdict.action} to {verdict.target_groups} groups: {verdict.reason}"
