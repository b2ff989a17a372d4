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
