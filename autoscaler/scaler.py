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
from moeray.autoscaler.scaling import ScalingSnapshot, ScalingState, check_target, evaluate, record_action


class Scaler:
    def __init__(self, num_groups: int, num_experts: int):
        self.num_groups, self.num_experts = num_groups, num_experts
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

    def request(self, groups: int, policy: Policy, reason: str) -> dict:
        """Queue a resize to `groups`; ValueError (naming the bound) when it cannot be done."""
        check_target(groups, policy)
        if groups > self.num_experts:
            raise ValueError(f"cannot scale to {groups} expert groups: the model has {self.num_experts} experts per layer")
        if self.busy:
            raise ValueError(f"{self.busy}; try again when it is done")
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

    def evaluate(self, snapshot: ScalingSnapshot, policy: Policy, now: float) -> str | None:
        """The policy's look at the signals; queues its verdict's target. -> the reason when it acts."""
        if self.busy:
            return None
        verdict = evaluate(self.state, snapshot, policy, now)
        self.state = verdict.state
        if verdict.action == "hold":
            return None
        self.request(verdict.target_groups, policy, f"policy: {verdict.reason}")
        return f"{verdict.action} to {verdict.target_groups} groups: {verdict.reason}"
