"""The migration-aware planner (autoscaler/planner.py): exact small cases, then seeded random
property loops (every expert keeps a copy, anti-affinity, budget, pins, never worse than nothing)."""

import dataclasses

import numpy as np
import pytest
import torch

from moeray.actors.placement import PlacementPlan
from moeray.autoscaler.planner import Move, PlanLimits, Topology, loads_of, mean_imbalance, plan
from plans import random_plan

LIMITS = PlanLimits(max_moves=100, max_bytes=None, bytes_per_expert=1, max_replicas_per_expert=4,
                    target_imbalance=1.0)


def run(p2l, load, limits=LIMITS, nodes=None, num_experts=None):
    current = PlacementPlan(torch.tensor(p2l), num_experts or int(np.max(p2l)) + 1)
    load = torch.tensor(load, dtype=torch.float64)
    if load.dim() == 1:
        load = load[None]
    topology = Topology(tuple(nodes) if nodes else tuple(range(current.num_groups)))
    new, moves = plan(load, current, topology, limits)
    return current, new, moves, load


# --- exact small cases: one layer, every share <= SPLIT_LEVEL of a mean group unless said ----------


def test_worked_example_splits_the_hot_expert():
    current, new, moves, load = run([[[0, 1, 3], [2, 3, -1]]], [6, 1, 1, 1])
    assert new.physical_to_logical.tolist() == [[[0, 1, 3], [2, 3, 0]]]
    assert moves == [Move(0, 1, 2, old_expert=-1, new_expert=0, kind="replicate")]
    assert new.version == current.version + 1
    assert new.imbalance(load).tolist() == [1.0]


def test_move_one_expert_to_the_light_group():
    # g0 carries 5, g1 3 (mean 4): moving one expert evens them; replicating would leave 4.5 / 3.5
    _, new, moves, _ = run([[[0, 1, 2, 3, 4], [5, 6, 7, -1, -1]]], [1.0] * 8)
    assert new.physical_to_logical.tolist() == [[[-1, 1, 2, 3, 4], [5, 6, 7, 0, -1]]]
    assert moves == [Move(0, 0, 0, 0, -1, "move"), Move(0, 1, 3, -1, 0, "move")]
    assert loads_of(moves) == 1


def test_swap_when_every_slot_is_full():
    # g0 = 2+2+1+1 = 6, g1 = 4 and no free slot: swap a 2 for a 1 (2 loads) -> 5 / 5
    _, new, moves, load = run([[[0, 1, 2, 3], [4, 5, 6, 7]]], [2, 2, 1, 1, 1, 1, 1, 1])
    assert new.physical_to_logical.tolist() == [[[4, 1, 2, 3], [0, 5, 6, 7]]]
    assert moves == [Move(0, 0, 0, 0, 4, "swap"), Move(0, 1, 0, 4, 0, "swap")]
    assert loads_of(moves) == 2
    assert new.imbalance(load).tolist() == [1.0]


def test_drop_a_spare_copy_is_free():
    # expert 7 has two copies (0.5 each): g0 = 4.5, g1 = 3.5; dropping g0's copy gives 4 / 4 at no cost
    limits = dataclasses.replace(LIMITS, max_moves=0)
    _, new, moves, _ = run([[[0, 1, 2, 3, 7], [4, 5, 6, 7, -1]]], [1.0] * 8, limits)
    assert new.physical_to_logical.tolist() == [[[0, 1, 2, 3, -1], [4, 5, 6, 7, -1]]]
    assert moves == [Move(0, 0, 4, 7, -1, "drop")]
    assert loads_of(moves) == 0


def test_split_prefers_a_node_without_a_copy():
    # expert 0 (load 4) splits; groups 1 and 2 are alike, but group 1 shares node 0 with group 0
    p2l = [[[0, 1, 2, 3, -1], [4, 5, 6, 7, -1], [8, 9, 10, 11, -1]]]
    load = [4.0] + [1.0] * 11
    one = dataclasses.replace(LIMITS, max_moves=1)
    _, new, moves, _ = run(p2l, load, one, nodes=(0, 0, 1))
    assert moves == [Move(0, 2, 4, -1, 0, "replicate")]
    _, new, moves, _ = run(p2l, load, one, nodes=(0, 1, 2))  # no node holds two: the first group wins
    assert moves == [Move(0, 1, 4, -1, 0, "replicate")]


def test_split_takes_the_pair_that_leaves_the_layer_best():
    # experts 0, 2, 3 tie (load 3); splitting 0 (the light group's) would lift g1, splitting 2 evens both
    _, new, moves, load = run([[[0, 1, -1], [2, 3, -1]]], [3.0, 0.0, 3.0, 3.0])
    assert moves == [Move(0, 0, 2, -1, 2, "replicate")]
    assert new.group_load(load).tolist() == [[4.5, 4.5]]


def test_a_split_the_budget_cannot_follow_up_is_undone():
    # the only split (0 into g1) lifts g1 from 6 to 7.5; the swap that fixes it needs 2 more loads
    p2l, load = [[[0, 1, 2], [3, 4, -1]]], [3.0, 0.0, 0.0, 3.0, 3.0]
    for budget in (1, 2):
        current, new, moves, _ = run(p2l, load, dataclasses.replace(LIMITS, max_moves=budget))
        assert new is current and moves == []
    _, new, moves, load = run(p2l, load, dataclasses.replace(LIMITS, max_moves=3))
    assert new.group_load(load).tolist() == [[4.5, 4.5]] and loads_of(moves) == 3
    assert sorted(m.kind for m in moves) == ["replicate", "swap", "swap"]


def test_nothing_to_do_returns_the_current_plan():
    current, new, moves, _ = run([[[0, 1], [2, 3]]], [1.0, 1.0, 1.0, 1.0])
    assert new is current and moves == []


def test_idle_layer_is_left_alone():
    current, new, moves, _ = run([[[0, 1, 2], [3, -1, -1]]], [0.0, 0.0, 0.0, 0.0])
    assert new is current and moves == []


def test_target_stops_the_layer():
    # imbalance 5/4 = 1.25: a target of 1.3 is already met
    current, new, moves, _ = run([[[0, 1, 2, 3, 4], [5, 6, 7, -1, -1]]], [1.0] * 8,
                                 dataclasses.replace(LIMITS, target_imbalance=1.3))
    assert new is current and moves == []


def test_budget_of_zero_loads_changes_nothing_that_costs():
    limits = dataclasses.replace(LIMITS, max_moves=0)
    current, new, moves, _ = run([[[0, 1, 2, 3, 4], [5, 6, 7, -1, -1]]], [1.0] * 8, limits)
    assert new is current and moves == []


def test_max_bytes_caps_loads():
    p2l = [[[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]]]
    load = [[2, 2, 1, 1, 1, 1, 1, 1]] * 2  # each layer wants one swap (2 loads)
    limits = dataclasses.replace(LIMITS, bytes_per_expert=10, max_bytes=39)  # 3 loads
    assert limits.max_loads == 3
    _, new, moves, _ = run(p2l, load, limits)
    assert loads_of(moves) == 2 and {m.layer for m in moves} == {0}  # lower layer first on a tie


def test_replica_cap():
    limits = dataclasses.replace(LIMITS, max_replicas_per_expert=1)
    current, new, moves, _ = run([[[0, 1, 3], [2, 3, -1]]], [6, 1, 1, 1], limits)
    assert int(new.replica_count.max()) <= 2  # never more copies than the cap or the current plan
    assert all(m.kind != "replicate" for m in moves)


def test_pinned_copy_stays():
    limits = dataclasses.replace(LIMITS, pinned=frozenset({(0, 0, 0)}))
    _, new, moves, _ = run([[[0, 1, 2, 3, 4], [5, 6, 7, -1, -1]]], [1.0] * 8, limits)
    assert new.physical_to_logical.tolist() == [[[0, -1, 2, 3, 4], [5, 6, 7, 1, -1]]]
    assert int(new.physical_to_logical[0, 0, 0]) == 0


def test_only_the_allowed_layers_change():
    p2l = [[[0, 1, 2, 3, 4], [5, 6, 7, -1, -1]]] * 2
    limits = dataclasses.replace(LIMITS, layers=frozenset({1}))
    current, new, moves, _ = run(p2l, [[1.0] * 8] * 2, limits)
    assert torch.equal(new.physical_to_logical[0], current.physical_to_logical[0])
    assert {m.layer for m in moves} == {1}


@pytest.mark.parametrize("bad, match", [
    (dict(load=torch.ones(2, 4)), "load has shape"),
    (dict(load=-torch.ones(1, 4)), "finite and >= 0"),
    (dict(topology=Topology((0,))), "topology names 1 groups"),
    (dict(limits=dataclasses.replace(LIMITS, max_moves=-1)), "max_moves"),
    (dict(limits=dataclasses.replace(LIMITS, max_replicas_per_expert=0)), "max_replicas_per_expert"),
    (dict(limits=dataclasses.replace(LIMITS, target_imbalance=0.9)), "target_imbalance"),
    (dict(limits=dataclasses.replace(LIMITS, layers=frozenset({3}))), "outside"),
])
def test_bad_inputs_raise(bad, match):
    args = dict(load=torch.ones(1, 4), current=PlacementPlan(torch.tensor([[[0, 1], [2, 3]]]), 4),
                topology=Topology((0, 1)), limits=LIMITS)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        plan(**args)


# --- behaviour at a larger scale ------------------------------------------------------------------------


def zipf_load(rng, num_layers, num_experts, total, exponent=1.1):
    ranks = np.stack([rng.permutation(num_experts) for _ in range(num_layers)]) + 1
    p = ranks ** -exponent
    return torch.tensor(total * p / p.sum(-1, keepdims=True))


def test_converges_from_the_default_plan_and_then_stays_put():
    """With budget enough, a skewed load is balanced from the contiguous default (the hot experts
    are split first: greedy packing around them would get stuck), and planning again on the same
    load moves nothing."""
    rng = np.random.default_rng(0)
    load = zipf_load(rng, 2, 64, 64 * 100)
    current = PlacementPlan.default(2, 64, 8, redundant_slots=1)
    limits = dataclasses.replace(LIMITS, max_moves=10_000, max_replicas_per_expert=8, target_imbalance=1.02)
    topology = Topology(tuple(g // 4 for g in range(8)))
    assert mean_imbalance(current, load) > 2
    new, moves = plan(load, current, topology, limits)
    assert new.imbalance(load).max() <= 1.02
    again, more = plan(load, new, topology, limits)
    assert again is new and more == []


# --- properties, seeded random loops ----------------------------------------------------------------


def random_limits(rng, num_layers, current):
    pins = set()
    for _ in range(rng.integers(0, 4)):
        layer, group = int(rng.integers(num_layers)), int(rng.integers(current.num_groups))
        expert = int(current.physical_to_logical[layer, group, rng.integers(current.slots_per_group)])
        pins.add((layer, group, expert))
    layers = None if rng.random() < 0.6 else frozenset(int(x) for x in rng.choice(num_layers, 2, replace=False))
    return PlanLimits(max_moves=int(rng.integers(0, 25)),
                      max_bytes=None if rng.random() < 0.5 else int(rng.integers(0, 200)),
                      bytes_per_expert=int(rng.integers(1, 20)),
                      max_replicas_per_expert=int(rng.integers(1, current.num_groups + 1)),
                      target_imbalance=float(rng.choice([1.0, 1.02, 1.1, 1.3])), layers=layers,
                      pinned=frozenset(pins), min_gain=float(rng.choice([0.0, 0.0, 0.01])))


@pytest.mark.parametrize("seed", range(40))
def test_properties(seed):
    rng = np.random.default_rng(seed)
    num_layers, num_groups, slots = 3, int(rng.integers(2, 7)), int(rng.integers(2, 6))
    num_experts = int(rng.integers(num_groups, num_groups * slots + 1))
    current = random_plan(rng, num_layers, num_experts, num_groups, slots)
    if rng.random() < 0.5:
        load = torch.tensor(np.exp(rng.normal(0, 1.5, (num_layers, num_experts))) * 100)
    else:
        load = zipf_load(rng, num_layers, num_experts, 1000.0)
    load[0, : rng.integers(0, num_experts)] = 0  # some idle experts
    limits = random_limits(rng, num_layers, current)
    topology = Topology(tuple(int(x) for x in rng.integers(0, 3, num_groups)))

    new, moves = plan(load, current, topology, limits)
    p2l, old = new.physical_to_logical, current.physical_to_logical
    for layer in range(num_layers):  # every expert keeps a copy; no group holds two (checked from scratch)
        assert set(p2l[layer].flatten().tolist()) - {-1} == set(range(num_experts))
        for group in range(num_groups):
            ids = [e for e in p2l[layer, group].tolist() if e >= 0]
            assert len(ids) == len(set(ids))
    assert loads_of(moves) <= limits.max_loads  # the budget
    assert loads_of(moves) * limits.bytes_per_expert <= (limits.max_bytes if limits.max_bytes is not None else 1e18)
    diff = sorted((m.layer, m.group, m.slot, m.old_expert, m.new_expert) for m in moves)  # moves == the diff
    assert diff == [(l, g, s, int(old[l, g, s]), int(p2l[l, g, s])) for l, g, s in (p2l != old).nonzero().tolist()]
    assert all(m.kind in ("replicate", "move", "swap", "drop") for m in moves)
    assert (new.imbalance(load) <= current.imbalance(load) + 1e-9).all()  # never worse than doing nothing
    cap = torch.maximum(current.replica_count, torch.tensor(limits.max_replicas_per_expert))
    assert (new.replica_count <= cap).all()
    for layer, group, expert in limits.pinned:  # pinned copies stay (a pin on an empty slot pins nothing)
        assert expert < 0 or expert in p2l[layer, group].tolist()
    if limits.layers is not None:
        for layer in set(range(num_layers)) - limits.layers:
            assert torch.equal(p2l[layer], old[layer])
    assert new.version == current.version + (1 if moves else 0)
    again, moves_again = plan(load, current, topology, limits)  # deterministic
    assert again == new and moves_again == moves
