"""Trace replay (autoscaler/simulate.py): each round plans on window r and is judged on window r + 1."""

import numpy as np
import pytest
import torch

from moeray.actors.placement import PlacementPlan
from moeray.autoscaler.planner import PlanLimits, Topology, loads_of, mean_imbalance, plan
from moeray.autoscaler.simulate import initial_plan, simulate

LIMITS = PlanLimits(max_moves=8, max_bytes=None, bytes_per_expert=1000, max_replicas_per_expert=4,
                    target_imbalance=1.02)
TOPOLOGY = Topology((0, 0, 1, 1))


def trace(num_windows=4, seed=0):
    """[R, L=2, E=16] multinomial windows around a fixed skewed popularity."""
    rng = np.random.default_rng(seed)
    p = np.exp(rng.normal(0, 1, (2, 16)))
    p /= p.sum(-1, keepdims=True)
    return torch.tensor(np.stack([rng.multinomial(2000, p) for _ in range(num_windows)]), dtype=torch.float64)


def test_records_match_a_hand_replay():
    windows = trace()
    initial = initial_plan(2, 16, 4, 5)
    records = simulate(windows, initial, TOPOLOGY, LIMITS)
    assert [rec.round for rec in records] == [0, 1, 2]
    current = initial
    for r, rec in enumerate(records):
        new, moves = plan(windows[r], current, TOPOLOGY, LIMITS)
        assert rec.imbalance_before == mean_imbalance(current, windows[r + 1])
        assert rec.imbalance_after == mean_imbalance(new, windows[r + 1])
        assert rec.imbalance_fitted == mean_imbalance(new, windows[r])
        assert rec.num_loads == loads_of(moves) <= LIMITS.max_moves
        assert rec.num_bytes == 1000 * rec.num_loads
        assert rec.version == new.version and list(rec.moves) == moves
        current = new
    assert records[0].num_loads > 0 and records[0].imbalance_after < records[0].imbalance_before


def test_a_planner_that_does_nothing():
    windows = trace(3)
    initial = initial_plan(2, 16, 4, 5)
    records = simulate(windows, initial, TOPOLOGY, LIMITS, planner=lambda load, current, topo, lim: (current, []))
    assert all(rec.imbalance_before == rec.imbalance_after and rec.num_loads == 0 for rec in records)
    assert all(rec.version == initial.version for rec in records)


def test_trace_shape_is_checked():
    initial = initial_plan(2, 16, 4, 5)
    with pytest.raises(ValueError, match="windows >= 2"):
        simulate(trace(1), initial, TOPOLOGY, LIMITS)
    with pytest.raises(ValueError, match="windows >= 2"):
        simulate(torch.ones(2, 16), initial, TOPOLOGY, LIMITS)


def test_initial_plan_deepseek_v3_shape():
    plan_ = initial_plan(1, 256, 32, 9)
    assert tuple(plan_.physical_to_logical.shape) == (1, 32, 9)
    assert plan_ == PlacementPlan.default(1, 256, 32, redundant_slots=1)
    assert int(plan_.replica_count.sum()) == 288  # every slot holds a copy


def test_initial_plan_needs_room():
    with pytest.raises(ValueError, match="cannot hold"):
        initial_plan(1, 16, 4, 3)
