"""The scaling state machine on replayed time: stabilisation, cooldowns, bounds, step size, reasons."""

import pytest

from moeray.autoscaler.policy import Policy, PolicyError, parse_policy
from moeray.autoscaler.scaling import ScalingSnapshot, ScalingState, check_target, evaluate, record_action

POLICY = parse_policy("trigger: {imbalance: 1.3}\n"
                      "scaling: {enabled: true, min_groups: 2, max_groups: 5, high_utilization: 0.8, "
                      "low_utilization: 0.3, max_queue_length: 4, scale_out_stabilization_s: 10, "
                      "scale_in_stabilization_s: 60, scale_out_cooldown_s: 30, scale_in_cooldown_s: 100}\n")


def snap(groups=3, utilization=0.5, queue=0, imbalance=1.0, stuck=False):
    return ScalingSnapshot(groups, utilization, queue, imbalance, stuck)


def replay(samples, policy=POLICY, state=None):
    """samples [(now, snapshot)] -> the verdicts, each evaluated on the state the one before left."""
    state, verdicts = state or ScalingState(), []
    for now, snapshot in samples:
        verdict = evaluate(state, snapshot, policy, now)
        verdicts.append(verdict)
        state = verdict.state
    return verdicts


def test_off_by_default_and_the_default_policy_validates():
    assert Policy().scaling.enabled is False
    verdict = evaluate(ScalingState(), snap(groups=1, queue=100, utilization=1.0), Policy(), now=0)
    assert (verdict.action, verdict.target_groups) == ("hold", 1) and "scaling.enabled: false" in verdict.reason


def test_pressure_must_hold_for_the_stabilization_window():
    hot = snap(utilization=0.9)
    verdicts = replay([(0, hot), (6, hot), (8, snap()), (9, hot), (15, hot), (19, hot)])
    assert [v.action for v in verdicts] == ["hold"] * 5 + ["scale_out"]
    assert "utilization 0.90 > scaling.high_utilization=0.8 for 0s of 10s" in verdicts[0].reason
    assert verdicts[2].state.pressure_since is None  # the dip restarted the clock
    assert verdicts[4].reason.endswith("for 6s of 10s")
    assert verdicts[5].target_groups == 4
    assert verdicts[5].reason == "scale out 3 -> 4 groups: utilization 0.90 > scaling.high_utilization=0.8 for 10s"


@pytest.mark.parametrize("snapshot, why", [
    (snap(queue=5), "5 waiting > scaling.max_queue_length=4"),
    (snap(imbalance=1.6, stuck=True), "imbalance 1.60 > trigger.imbalance=1.3 and placement cannot fix it"),
    (snap(queue=9, utilization=0.95), "9 waiting > scaling.max_queue_length=4 and utilization 0.95 > "
                                      "scaling.high_utilization=0.8"),
])
def test_each_kind_of_pressure_scales_out(snapshot, why):
    verdict = replay([(0, snapshot), (10, snapshot)])[-1]
    assert verdict.action == "scale_out" and verdict.reason == f"scale out 3 -> 4 groups: {why} for 10s"


@pytest.mark.parametrize("snapshot", [
    snap(queue=4),  # at the threshold, not above
    snap(imbalance=1.6),  # placement may still fix it
    snap(imbalance=1.2, stuck=True),  # under the trigger
    snap(utilization=0.8),
])
def test_no_pressure(snapshot):
    assert all(v.action == "hold" for v in replay([(t, snapshot) for t in range(0, 200, 5)]))


def test_scale_in_needs_low_utilization_and_an_empty_queue_for_the_longer_window():
    idle = snap(utilization=0.1)
    verdicts = replay([(0, idle), (59, idle), (60, idle)])
    assert [v.action for v in verdicts] == ["hold", "hold", "scale_in"]
    assert verdicts[1].reason == "utilization 0.10 < scaling.low_utilization=0.3, none waiting for 59s of 60s"
    assert verdicts[2].target_groups == 2 and verdicts[2].reason.startswith("scale in 3 -> 2 groups: ")
    waiting = replay([(0, idle), (30, snap(utilization=0.1, queue=1)), (60, idle), (100, idle)])
    assert [v.action for v in waiting] == ["hold"] * 4 and waiting[-1].reason.endswith("for 40s of 60s")


def test_pressure_wins_over_idle():
    """Low occupancy but an imbalance placement cannot fix: more slots, not fewer groups."""
    both = snap(utilization=0.1, imbalance=2.0, stuck=True)
    verdicts = replay([(0, both), (10, both)])
    assert verdicts[0].state.idle_since is None and verdicts[1].action == "scale_out"


def test_bounds_hold_and_out_of_bound_pools_are_fixed_at_once():
    at_max = replay([(0, snap(groups=5, queue=10)), (20, snap(groups=5, queue=10))])[-1]
    assert at_max.action == "hold" and at_max.reason.endswith("but the pool is at scaling.max_groups=5")
    at_min = replay([(0, snap(groups=2, utilization=0.0)), (100, snap(groups=2, utilization=0.0))])[-1]
    assert at_min.action == "hold" and at_min.reason.endswith("but the pool is at scaling.min_groups=2")
    cooling = ScalingState(last_action_at=0)
    lost = evaluate(cooling, snap(groups=1), POLICY, now=1)  # a group died: back to min_groups, cooldown or not
    assert (lost.action, lost.target_groups) == ("scale_out", 2)
    assert lost.reason == "scale out 1 -> 2 groups: below scaling.min_groups=2" and lost.state.last_action_at == 1
    shrunk = evaluate(cooling, snap(groups=9), POLICY, now=1)  # the policy's max_groups went down
    assert (shrunk.action, shrunk.target_groups) == ("scale_in", 5)


def test_step_size_is_clamped_to_the_bounds():
    policy = POLICY.model_copy(update={"scaling": POLICY.scaling.model_copy(
        update={"scale_out_step": 2, "scale_in_step": 3, "scale_out_stabilization_s": 0,
                "scale_in_stabilization_s": 0})})
    assert evaluate(ScalingState(), snap(groups=2, queue=9), policy, now=0).target_groups == 4
    assert evaluate(ScalingState(), snap(groups=4, queue=9), policy, now=0).target_groups == 5
    assert evaluate(ScalingState(), snap(groups=5, utilization=0.0), policy, now=0).target_groups == 2
    assert evaluate(ScalingState(), snap(groups=4, utilization=0.0), policy, now=0).target_groups == 2


def test_cooldowns_count_from_the_last_action_of_either_direction():
    hot, idle = snap(groups=4, queue=9), snap(groups=4, utilization=0.0)
    out = replay([(0, snap(queue=9)), (10, snap(queue=9))])[-1]
    assert out.action == "scale_out" and out.state == ScalingState(last_action_at=10)
    again = replay([(11, hot), (21, hot), (39, hot), (40, hot)], state=out.state)  # 30s scale-out cooldown
    assert [v.action for v in again] == ["hold", "hold", "hold", "scale_out"]
    assert again[1].reason.endswith("; scale-out cooldown: 19s left") and again[-1].reason.endswith("for 29s")
    down = replay([(11, idle), (71, idle), (109, idle), (110, idle)], state=out.state)  # 100s scale-in cooldown
    assert [v.action for v in down] == ["hold", "hold", "hold", "scale_in"]
    assert down[1].reason.endswith("; scale-in cooldown: 39s left")


def test_an_admin_scale_starts_the_cooldowns_too():
    state = record_action(now=50)
    hot = snap(queue=9)
    verdicts = replay([(50, hot), (60, hot), (80, hot)], state=state)
    assert [v.action for v in verdicts] == ["hold", "hold", "scale_out"]


def test_no_flapping_on_a_replayed_day():
    """A load that flips between busy and idle at every look never scales (neither holds for its window);
    a sustained rise scales out once per cooldown, up to max_groups; a long lull scales in once per
    scale-in cooldown, down to min_groups."""
    groups, actions, state = 3, [], ScalingState()
    for now in range(0, 4000, 5):
        if now < 1000:
            utilization = 0.9 if (now // 5) % 2 else 0.1
        elif now < 2000:
            utilization = 0.95
        else:
            utilization = 0.05
        verdict = evaluate(state, snap(groups=groups, utilization=utilization), POLICY, now)
        state = verdict.state
        if verdict.action != "hold":
            actions.append((now, verdict.action, verdict.target_groups))
            groups = verdict.target_groups
    assert [a for a in actions if a[0] < 1000] == []
    outs = [a for a in actions if a[1] == "scale_out"]
    ins = [a for a in actions if a[1] == "scale_in"]
    assert [a[2] for a in outs] == [4, 5] and outs[1][0] - outs[0][0] >= 30
    assert [a[2] for a in ins] == [4, 3, 2] and all(b[0] - a[0] >= 100 for a, b in zip(ins, ins[1:]))
    assert ins[0][0] >= 2000 + 60


def test_check_target_names_the_bounds():
    check_target(3, POLICY)
    for bad in (1, 6, 3.0):
        with pytest.raises(ValueError, match=rf"cannot scale to {bad} expert groups: the policy allows "
                                             r"scaling.min_groups=2..scaling.max_groups=5"):
            check_target(bad, POLICY)


@pytest.mark.parametrize("text, expected", [
    ("scaling:\n  low_utilization: 0.9\n", "p.yaml:1: scaling: Value error, low_utilization (0.9) must be below "
                                           "high_utilization (0.85), or the pool would flap"),
    ("scaling:\n  high_utilization: 1.5\n", "p.yaml:2: scaling.high_utilization: Input should be less than or equal to 1"),
    ("scaling:\n  scale_out_step: 0\n", "p.yaml:2: scaling.scale_out_step: Input should be greater than or equal to 1"),
    ("scaling:\n  max_queue_length: -1\n", "p.yaml:2: scaling.max_queue_length: Input should be greater than or equal to 0"),
    ("scaling:\n  enabled: sometimes\n", "p.yaml:2: scaling.enabled: Input should be a valid boolean"),
    ("scaling:\n  cooldown_s: 5\n", "p.yaml:2: scaling.cooldown_s: Extra inputs are not permitted"),
])
def test_bad_scaling_sections_are_reported_with_line_and_field(text, expected):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    assert any(expected in line for line in str(info.value).splitlines()), str(info.value)
