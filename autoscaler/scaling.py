"""When to add or remove expert groups (pure): the policy's `scaling` section as a state machine.

Signals, one `ScalingSnapshot` per evaluation, all measured by the router:
- utilization: *batch occupancy*, the mean over the steps since the last evaluation of running
  sequences / max_num_seqs, in [0, 1]. Why not the router's busy fraction (time in steps / wall
  time)? With continuous batching the step loop runs without pause as soon as one sequence is in
  flight, so the busy fraction reads 1.0 for a single request and would scale out an idle pool.
  Occupancy measures demand: it rises with concurrent requests, and adding groups (shorter steps,
  so sequences finish sooner) lowers it, which is the effect a scale-out should have.
- queue_length: requests waiting for a place in the batch. It also catches demand occupancy
  cannot show, when the KV cache rather than max_num_seqs is what keeps requests out.
- imbalance (worst MoE layer) and is_placement_stuck: the placement controller's last rebalance
  ended without a move that helps ("no move improves balance") with that layer still above
  trigger.imbalance, so replication within the pool cannot fix it: more groups bring more slots.

    pressure = queue_length > max_queue_length
               or utilization > high_utilization
               or (imbalance > trigger.imbalance and is_placement_stuck)
    idle     = not pressure and utilization < low_utilization and queue_length == 0

    pressure held scale_out_stabilization_s -> scale out by scale_out_step (at most to max_groups)
    idle held scale_in_stabilization_s      -> scale in by scale_in_step (at least to min_groups)

Cooldowns count from the last scale action of either direction: a scale-out may follow any action
after scale_out_cooldown_s, a scale-in after scale_in_cooldown_s, so a pool that just grew does not
shrink before the new group has had time to take load. An action also restarts both stabilisation
windows: only evidence gathered on the new pool counts. A pool outside min_groups..max_groups (a
group died, or the policy changed) is brought back at once, without waiting for windows or
cooldowns: those guard against noise in the load, and a bound is not noise.

Hysteresis across a step: at the same request rate, G -> G-1 groups raises occupancy by at most
G/(G-1) (steps at most that much longer), so low_utilization * G/(G-1) < high_utilization keeps
a scale-in from triggering the scale-out that undoes it (defaults: 0.3 * 2 = 0.6 < 0.85).

`evaluate` never reads the clock; the caller passes `now`, so tests replay time. Which group to
drain on a scale-in, and the plans for it, are reshape.py's (drain_candidate, grow, drain).
"""

from dataclasses import dataclass, replace
from typing import Literal

from moeray.autoscaler.policy import Policy, Scaling

Action = Literal["hold", "scale_out", "scale_in"]


@dataclass(frozen=True)
class ScalingSnapshot:
    num_groups: int  # expert groups serving now
    utilization: float  # batch occupancy in [0, 1]: running sequences / max_num_seqs, mean since the last look
    queue_length: int  # requests waiting for a place in the batch
    imbalance: float  # worst MoE layer's busiest group / mean group (1.0 = perfect)
    is_placement_stuck: bool  # placement's last rebalance ended with that layer still above trigger.imbalance


@dataclass(frozen=True)
class ScalingState:
    pressure_since: float | None = None  # when the scale-out pressure began, None while there is none
    idle_since: float | None = None  # when the pool went idle, None while it is not
    last_action_at: float | None = None  # the last scale action (either direction, policy or admin)


@dataclass(frozen=True)
class ScalingVerdict:
    action: Action
    target_groups: int  # the pool size to go to; == snapshot.num_groups on "hold"
    reason: str
    state: ScalingState


def evaluate(state: ScalingState, snapshot: ScalingSnapshot, policy: Policy, now: float) -> ScalingVerdict:
    """One look at the signals -> hold, or scale to target_groups, with the reason and the next state."""
    scaling, groups = policy.scaling, snapshot.num_groups
    if not scaling.enabled:
        return ScalingVerdict("hold", groups, "scaling is off (scaling.enabled: false)", state)
    if groups < scaling.min_groups:
        return _act("scale_out", groups, scaling.min_groups, f"below scaling.min_groups={scaling.min_groups}", now)
    if groups > scaling.max_groups:
        return _act("scale_in", groups, scaling.max_groups, f"above scaling.max_groups={scaling.max_groups}", now)
    pressure = _pressure(snapshot, policy)
    idle = None if pressure else _idle(snapshot, policy)
    state = replace(state, pressure_since=_since(state.pressure_since, pressure, now),
                    idle_since=_since(state.idle_since, idle, now))
    if pressure:
        return _maybe("scale_out", pressure, now - state.pressure_since, snapshot, scaling, state, now)
    if idle:
        return _maybe("scale_in", idle, now - state.idle_since, snapshot, scaling, state, now)
    return ScalingVerdict("hold", groups, f"steady: utilization {snapshot.utilization:.2f} within "
                                          f"[{scaling.low_utilization}, {scaling.high_utilization}], "
                                          f"{snapshot.queue_length} waiting", state)


def record_action(now: float) -> ScalingState:
    """The state after the pool was resized at `now` (by `evaluate`'s verdict or by `moeray scale`):
    the cooldowns start, the stabilisation windows start afresh."""
    return ScalingState(last_action_at=now)


def check_target(groups: int, policy: Policy) -> None:
    """An admin request for `groups` expert groups must lie within the policy's bounds."""
    scaling = policy.scaling
    if type(groups) is not int or not scaling.min_groups <= groups <= scaling.max_groups:
        raise ValueError(f"cannot scale to {groups!r} expert groups: the policy allows "
                         f"scaling.min_groups={scaling.min_groups}..scaling.max_groups={scaling.max_groups}")


def resource_shortfall(per_group: dict[str, float], new_groups: int, free: dict[str, float]) -> str | None:
    """Why `new_groups` more expert groups, each asking Ray for `per_group`, cannot be placed on the
    cluster's `free` resources now (each missing resource named), or None when they fit."""
    short = []
    for name, amount in sorted(per_group.items()):
        need, have = amount * new_groups, free.get(name, 0.0)
        if need > have:
            unit, scale = (" GiB", 2**30) if name in ("memory", "object_store_memory") else ("", 1)
            short.append(f"{need / scale:.4g}{unit} of resource {name!r} ({have / scale:.4g}{unit} free)")
    if not short:
        return None
    return f"{new_groups} more expert group(s) need " + ", ".join(short)


def _pressure(snapshot: ScalingSnapshot, policy: Policy) -> str | None:
    """Why the pool needs more groups, or None."""
    scaling, why = policy.scaling, []
    if snapshot.queue_length > scaling.max_queue_length:
        why.append(f"{snapshot.queue_length} waiting > scaling.max_queue_length={scaling.max_queue_length}")
    if snapshot.utilization > scaling.high_utilization:
        why.append(f"utilization {snapshot.utilization:.2f} > scaling.high_utilization={scaling.high_utilization}")
    if snapshot.is_placement_stuck and snapshot.imbalance > policy.trigger.imbalance:
        why.append(f"imbalance {snapshot.imbalance:.2f} > trigger.imbalance={policy.trigger.imbalance} "
                   f"and placement cannot fix it")
    return " and ".join(why) or None


def _idle(snapshot: ScalingSnapshot, policy: Policy) -> str | None:
    """Why the pool could do with fewer groups, or None."""
    scaling = policy.scaling
    if snapshot.utilization < scaling.low_utilization and snapshot.queue_length == 0:
        return (f"utilization {snapshot.utilization:.2f} < scaling.low_utilization={scaling.low_utilization}, "
                f"none waiting")
    return None


def _since(since: float | None, condition: str | None, now: float) -> float | None:
    """A stabilisation clock: starts when the condition appears, clears when it goes."""
    if condition is None:
        return None
    return now if since is None else since


def _maybe(action: Action, why: str, held: float, snapshot: ScalingSnapshot, scaling: Scaling, state: ScalingState,
           now: float) -> ScalingVerdict:
    """Act once `why` has held for the window, outside the cooldown, and if the bound leaves room."""
    groups = snapshot.num_groups
    if action == "scale_out":
        window, cooldown = scaling.scale_out_stabilization_s, scaling.scale_out_cooldown_s
        target, bound = min(groups + scaling.scale_out_step, scaling.max_groups), "max_groups"
    else:
        window, cooldown = scaling.scale_in_stabilization_s, scaling.scale_in_cooldown_s
        target, bound = max(groups - scaling.scale_in_step, scaling.min_groups), "min_groups"
    if held < window:
        return ScalingVerdict("hold", groups, f"{why} for {held:.0f}s of {window:.0f}s", state)
    if target == groups:
        return ScalingVerdict("hold", groups, f"{why}, but the pool is at scaling.{bound}={groups}", state)
    left = 0.0 if state.last_action_at is None else cooldown - (now - state.last_action_at)
    if left > 0:
        direction = action.replace("_", "-")
        return ScalingVerdict("hold", groups, f"{why}; {direction} cooldown: {left:.0f}s left", state)
    return _act(action, groups, target, f"{why} for {held:.0f}s", now)


def _act(action: Action, groups: int, target: int, why: str, now: float) -> ScalingVerdict:
    return ScalingVerdict(action, target, f"{action.replace('_', ' ')} {groups} -> {target} groups: {why}",
                          record_action(now))
