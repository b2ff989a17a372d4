"""When to rebalance (pure): the policy's trigger, stabilisation, rounds and cooldown as a state machine.

    watching --(some layer above its trigger for stabilization_s)--> rebalancing
    rebalancing --(a round every round_spacing_s, until every layer <= target)--> cooldown
    cooldown --(cooldown_s later)--> watching

The gap between trigger and target, the stabilisation window and the cooldown are the
hysteresis: a layer that hovers at the trigger does not start rebalance after rebalance.
`evaluate` never looks at the clock itself; the caller passes `now`, so tests replay time.
"""

from dataclasses import dataclass, replace
from typing import Literal

from moeray.autoscaler.policy import Policy

Phase = Literal["watching", "rebalancing", "cooldown"]


@dataclass(frozen=True)
class TriggerState:
    phase: Phase = "watching"
    phase_since: float = 0.0
    above_since: float | None = None  # watching: when some layer went above its trigger
    last_round: float | None = None  # rebalancing: when the last round was planned
    rounds: int = 0  # rounds planned in this rebalance


@dataclass(frozen=True)
class Verdict:
    plan: bool  # True: plan a migration round now
    reason: str
    state: TriggerState
    done: bool = False  # this call ended a rebalance


def evaluate(state: TriggerState, imbalance: list[float], tokens: list[float], policy: Policy, now: float) -> Verdict:
    """imbalance [L] and tokens [L] (routed (token, expert) pairs per MoE layer) -> what to do now."""
    layers = [layer for layer in range(len(imbalance)) if policy.trigger_for(layer) is not None]
    if not layers:
        return Verdict(False, "every layer is frozen by layer_overrides", state)
    if state.phase == "cooldown":
        left = policy.trigger.cooldown_s - (now - state.phase_since)
        if left > 0:
            return Verdict(False, f"cooldown: {left:.0f}s left", state)
        state = TriggerState(phase="watching", phase_since=now)
    quiet = min(layers, key=lambda layer: tokens[layer])
    if tokens[quiet] < policy.load.min_tokens_per_layer:
        return Verdict(False, f"too little traffic to judge: MoE layer {quiet} saw {tokens[quiet]:.0f} routed pairs "
                              f"(< load.min_tokens_per_layer={policy.load.min_tokens_per_layer})",
                       replace(state, above_since=None) if state.phase == "watching" else state)
    worst = max(layers, key=lambda layer: imbalance[layer] / policy.trigger_for(layer))
    if state.phase == "watching":
        threshold = policy.trigger_for(worst)
        if imbalance[worst] <= threshold:
            return Verdict(False, f"balanced: worst MoE layer {worst} at {imbalance[worst]:.2f} <= trigger {threshold}",
                           replace(state, above_since=None))
        since = now if state.above_since is None else state.above_since
        held = now - since
        if held < policy.trigger.stabilization_s:
            return Verdict(False, f"MoE layer {worst} at {imbalance[worst]:.2f} > trigger {threshold} for {held:.0f}s "
                                  f"of {policy.trigger.stabilization_s:.0f}s", replace(state, above_since=since))
        return Verdict(True, f"rebalance: MoE layer {worst} at {imbalance[worst]:.2f} > trigger {threshold} for {held:.0f}s",
                       TriggerState(phase="rebalancing", phase_since=now, last_round=now, rounds=1))
    over = [layer for layer in layers if imbalance[layer] > policy.target.imbalance]
    if not over:
        return finish(state, now, f"target reached: every layer <= {policy.target.imbalance} after {state.rounds} round(s)")
    if state.last_round is not None and now - state.last_round < policy.budget.round_spacing_s:
        return Verdict(False, f"rebalancing: next round in {policy.budget.round_spacing_s - (now - state.last_round):.0f}s",
                       state)
    return Verdict(True, f"rebalance round {state.rounds + 1}: {len(over)} layer(s) above target "
                         f"{policy.target.imbalance}, worst MoE layer {worst} at {imbalance[worst]:.2f}",
                   replace(state, last_round=now, rounds=state.rounds + 1))


def finish(state: TriggerState, now: float, reason: str) -> Verdict:
    """End a rebalance (target reached, or the planner found no move worth making): cool down."""
    return Verdict(False, reason, TriggerState(phase="cooldown", phase_since=now, rounds=state.rounds), done=True)
