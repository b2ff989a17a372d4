"""The trigger state machine on replayed time: stabilisation, rounds, target, cooldown, frozen layers."""

from moeray.autoscaler.policy import parse_policy
from moeray.autoscaler.trigger import TriggerState, evaluate, finish

POLICY = parse_policy("trigger: {imbalance: 1.3, stabilization_s: 10, cooldown_s: 60}\ntarget: {imbalance: 1.1}\n"
                      "budget: {round_spacing_s: 5}\nload: {min_tokens_per_layer: 100}\n")
BUSY = [1000.0, 1000.0]


def test_imbalance_must_hold_for_the_stabilization_window():
    state = TriggerState()
    v = evaluate(state, [1.5, 1.0], BUSY, POLICY, now=0)
    assert not v.plan and "for 0s of 10s" in v.reason
    v = evaluate(v.state, [1.5, 1.0], BUSY, POLICY, now=6)
    assert not v.plan and v.state.above_since == 0
    dip = evaluate(v.state, [1.2, 1.0], BUSY, POLICY, now=8)  # back under the trigger: the clock restarts
    assert not dip.plan and dip.state.above_since is None
    v = evaluate(dip.state, [1.5, 1.0], BUSY, POLICY, now=9)
    assert not evaluate(v.state, [1.5, 1.0], BUSY, POLICY, now=15).plan
    go = evaluate(v.state, [1.5, 1.0], BUSY, POLICY, now=19)
    assert go.plan and go.state.phase == "rebalancing" and "MoE layer 0 at 1.50" in go.reason


def test_rounds_are_spaced_until_the_target_then_cooldown():
    state = TriggerState(phase="rebalancing", phase_since=0, last_round=0, rounds=1)
    assert "next round in" in evaluate(state, [1.2, 1.0], BUSY, POLICY, now=3).reason
    second = evaluate(state, [1.2, 1.0], BUSY, POLICY, now=5)
    assert second.plan and second.state.rounds == 2 and "round 2" in second.reason
    done = evaluate(second.state, [1.05, 1.1], BUSY, POLICY, now=11)  # 1.1 is at the target: done
    assert not done.plan and done.done and done.state.phase == "cooldown"
    assert "cooldown: 30s left" in evaluate(done.state, [2.0, 2.0], BUSY, POLICY, now=41).reason
    after = evaluate(done.state, [2.0, 1.0], BUSY, POLICY, now=72)  # cooldown over: watching again
    assert not after.plan and after.state.phase == "watching" and after.state.above_since == 72


def test_between_target_and_trigger_nothing_starts():
    """Hysteresis: a layer at 1.2 (above target 1.1, below trigger 1.3) never starts a rebalance."""
    state = TriggerState()
    for now in range(0, 100, 5):
        verdict = evaluate(state, [1.2, 1.25], BUSY, POLICY, now=now)
        assert not verdict.plan
        state = verdict.state


def test_too_little_traffic_and_frozen_layers_hold():
    v = evaluate(TriggerState(), [3.0, 1.0], [1000.0, 50.0], POLICY, now=0)
    assert not v.plan and "MoE layer 1 saw 50 routed pairs" in v.reason
    frozen = parse_policy("layer_overrides: [{layers: [0], enabled: false}]\ntrigger: {stabilization_s: 0}\n"
                          "load: {min_tokens_per_layer: 0}\n")
    assert not evaluate(TriggerState(), [3.0, 1.0], BUSY, frozen, now=0).plan  # layer 0 is frozen
    assert evaluate(TriggerState(), [1.0, 1.4], BUSY, frozen, now=0).plan
    all_frozen = parse_policy("layer_overrides: [{layers: [0, 1], enabled: false}]\n")
    assert "frozen" in evaluate(TriggerState(), [3.0, 3.0], BUSY, all_frozen, now=0).reason


def test_per_layer_trigger_override():
    lenient = parse_policy("layer_overrides: [{layers: [0], trigger_imbalance: 2.0}]\ntrigger: {stabilization_s: 0}\n"
                           "load: {min_tokens_per_layer: 0}\n")
    assert not evaluate(TriggerState(), [1.8, 1.0], BUSY, lenient, now=0).plan
    assert evaluate(TriggerState(), [2.1, 1.0], BUSY, lenient, now=0).plan


def test_finish_starts_the_cooldown():
    v = finish(TriggerState(phase="rebalancing", rounds=3), now=50, reason="no move helps")
    assert v.done and v.state.phase == "cooldown" and v.state.phase_since == 50 and v.state.rounds == 3
