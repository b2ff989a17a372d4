"""Scaler: queued resizes, one at a time, bounds named, and the policy's verdicts queued."""

import pytest

from moeray.autoscaler.policy import parse_policy
from moeray.autoscaler.scaler import Scaler
from moeray.autoscaler.scaling import ScalingSnapshot

POLICY = parse_policy("scaling: {enabled: true, min_groups: 1, max_groups: 4, scale_out_stabilization_s: 0, "
                      "scale_out_cooldown_s: 0}\n")


def test_a_request_is_taken_once_and_blocks_others_until_done():
    scaler = Scaler(num_groups=2, num_experts=8)
    assert scaler.request(3, POLICY, "operator")["result"] == "queued"
    assert scaler.busy == "scaling to 3 expert groups is in progress"
    with pytest.raises(ValueError, match="in progress"):
        scaler.request(4, POLICY, "operator")
    assert scaler.take() == (3, "operator") and scaler.take() is None
    assert scaler.last["result"] == "running"
    scaler.done(3, None, now=10.0)
    assert scaler.busy is None and scaler.num_groups == 3 and scaler.last["result"] == "done"
    assert scaler.request(1, POLICY, "operator")["target"] == 1


def test_bounds_are_named():
    scaler = Scaler(num_groups=2, num_experts=3)
    with pytest.raises(ValueError, match="scaling.min_groups=1..scaling.max_groups=4"):
        scaler.request(5, POLICY, "operator")
    with pytest.raises(ValueError, match="the model has 3 experts per layer"):
        scaler.request(4, POLICY, "operator")


def test_the_policys_verdict_is_queued():
    scaler = Scaler(num_groups=2, num_experts=8)
    reason = scaler.evaluate(ScalingSnapshot(2, 0.95, 0, 1.0, False), POLICY, now=0.0)
    assert reason is not None and reason.startswith("scale_out to 3 groups")
    assert scaler.take()[0] == 3
    assert scaler.evaluate(ScalingSnapshot(2, 0.95, 0, 1.0, False), POLICY, now=1.0) is None  # busy


def test_a_scale_out_the_cluster_cannot_place_is_refused_naming_the_resource():
    scaler = Scaler(num_groups=2, num_experts=8, group_demand={"GPU": 1})
    with pytest.raises(ValueError, match=r"cannot scale to 4 expert groups: 2 more expert group\(s\) need 2 of "
                                         r"resource 'GPU' \(1 free\)"):
        scaler.request(4, POLICY, "operator", free={"GPU": 1.0, "CPU": 16.0})
    assert scaler.busy is None and scaler.queued is None  # nothing queued, nothing pending
    assert scaler.request(3, POLICY, "operator", free={"GPU": 1.0})["result"] == "queued"  # one more fits


def test_memory_shortfall_in_gib_and_scale_in_needs_nothing():
    scaler = Scaler(num_groups=3, num_experts=8, group_demand={"memory": 3 * 2**30})
    with pytest.raises(ValueError, match=r"1 more expert group\(s\) need 3 GiB of resource 'memory' \(2 GiB free\)"):
        scaler.request(4, POLICY, "operator", free={"memory": 2.0 * 2**30})
    assert scaler.request(1, POLICY, "operator", free={})["target"] == 1


def test_without_fixed_demand_the_cluster_may_grow_so_nothing_is_refused():
    scaler = Scaler(num_groups=2, num_experts=8, group_demand=None)  # custom group_resources: an autoscaler adds nodes
    assert scaler.request(4, POLICY, "operator", free={})["result"] == "queued"


def test_the_policys_refused_verdict_is_reported_and_starts_the_cooldown():
    policy = parse_policy("scaling: {enabled: true, min_groups: 1, max_groups: 4, scale_out_stabilization_s: 0, "
                          "scale_out_cooldown_s: 60}\n")
    scaler = Scaler(num_groups=2, num_experts=8, group_demand={"GPU": 1})
    busy = ScalingSnapshot(2, 0.95, 0, 1.0, False)
    reason = scaler.evaluate(busy, policy, now=0.0, free={"GPU": 0.0})
    assert reason.startswith("scale_out to 3 groups refused: cannot scale to 3 expert groups") and scaler.queued is None
    assert scaler.evaluate(busy, policy, now=30.0, free={"GPU": 0.0}) is None  # cooling down, not retrying every tick
