"""LoadTracker: exact counts per window, EMA and totals on a fake clock."""

import pytest
import torch

from moeray.actors.load import LoadSnapshot, LoadTracker
from moeray.actors.placement import PlacementPlan


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _step(tracker: LoadTracker, per_layer: list[list[list[int]]]) -> None:
    for layer, topk in enumerate(per_layer):
        tracker.add(layer, torch.tensor(topk))
    tracker.end_step()


def test_window_sums_only_recent_buckets_and_total_keeps_everything():
    clock = Clock()
    tracker = LoadTracker(num_layers=2, num_experts=4, bucket_s=1.0, num_buckets=5, clock=clock)
    plan = PlacementPlan.default(2, 4, 2)
    _step(tracker, [[[0, 1], [0, 2]], [[3, 3]]])  # t=100: layer 0 -> 0,1,0,2; layer 1 -> 3,3
    clock.now = 103.5
    _step(tracker, [[[1, 1]], [[2, 0]]])
    snap = tracker.snapshot(plan, window_s=2.0)  # buckets 2 and 3 only
    assert snap.window.tolist() == [[0, 2, 0, 0], [1, 0, 1, 0]]
    assert snap.window_steps == 1 and snap.steps == 2
    everything = tracker.snapshot(plan)
    assert everything.window.tolist() == [[2, 3, 1, 0], [1, 0, 1, 2]]
    assert everything.total.tolist() == [[2, 3, 1, 0], [1, 0, 1, 2]]
    assert everything.window_s == pytest.approx(3.5)
    clock.now = 110.0  # idle past the whole ring: the window empties, the total stays
    later = tracker.snapshot(plan)
    assert later.window.sum() == 0 and later.window_steps == 0
    assert later.total.sum() == 10


def test_group_load_and_imbalance_follow_the_plan():
    clock = Clock()
    tracker = LoadTracker(num_layers=1, num_experts=4, clock=clock)
    plan = PlacementPlan(torch.tensor([[[0, 1, 2], [2, 3, 0]]]), 4, version=7)  # 0 and 2 replicated
    _step(tracker, [[[0, 0], [0, 0], [1, 3]]])  # expert 0: 4 tokens split 2 + 2
    snap = tracker.snapshot(plan)
    assert snap.group_load.tolist() == [[3.0, 3.0]]
    assert snap.imbalance.tolist() == [1.0]
    assert snap.plan_version == 7
    lopsided = PlacementPlan(torch.tensor([[[0, 1], [2, 3]]]), 4)
    assert tracker.snapshot(lopsided).imbalance.tolist() == [pytest.approx(5 / 3)]  # 5 vs 1 tokens


def test_ema_weights_recent_steps_and_snapshot_round_trips_through_json():
    tracker = LoadTracker(num_layers=1, num_experts=2, ema_alpha=0.5, clock=Clock())
    _step(tracker, [[[0]]])
    _step(tracker, [[[1]]])
    snap = tracker.snapshot(PlacementPlan.default(1, 2, 1))
    assert snap.ema.tolist() == [[0.25, 0.5]]
    again = LoadSnapshot.from_dict(snap.to_dict())
    assert torch.equal(again.window, snap.window) and torch.equal(again.ema, snap.ema)
    assert again.steps == 2


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="ema_alpha"):
        LoadTracker(1, 2, ema_alpha=0.0)
