"""Reshaping plans when groups come and go (autoscaler/reshape.py): the worked example, exact small
cases and PlanErrors, then seeded property loops (valid plans, serving groups load nothing on grow,
drain empties and keeps every expert, renumbering, lose_group reports exactly the lost pairs)."""

import dataclasses

import numpy as np
import pytest
import torch

from moeray.actors.placement import PlacementPlan, PlanError
from moeray.autoscaler.planner import Move, PlanLimits, Topology, plan
from moeray.autoscaler.reshape import drain, drain_candidate, grow, lose_group, remove_group
from plans import random_plan

LIMITS = PlanLimits(max_moves=0, max_bytes=None, bytes_per_expert=1, max_replicas_per_expert=4, target_imbalance=1.0)
LOAD = torch.tensor([[6.0, 2.0, 2.0, 2.0]])


def _plan(p2l, num_experts=4, version=0):
    return PlacementPlan(torch.tensor(p2l), num_experts, version)


def _nodes(num_groups):
    return Topology(tuple(range(num_groups)))


# --- the module docstring's worked example ---------------------------------------------------------------


def test_worked_example():
    current = _plan([[[0, 1, -1], [2, 3, 0]]], version=3)
    assert current.group_load(LOAD).tolist() == [[5.0, 7.0]]

    grown, moves = grow(current, 1, LOAD, LIMITS, _nodes(3))
    assert grown.physical_to_logical.tolist() == [[[0, 1, -1], [2, 3, 0], [0, 2, 3]]]
    assert grown.version == 4 and grown.group_load(LOAD).tolist() == [[4.0, 4.0, 4.0]]
    assert moves == [Move(0, 2, 0, -1, 0, "replicate"), Move(0, 2, 1, -1, 2, "replicate"),
                     Move(0, 2, 2, -1, 3, "replicate")]

    drained, moves = drain(grown, 0, LOAD, LIMITS, _nodes(3))
    assert drained.physical_to_logical.tolist() == [[[-1, -1, -1], [1, 3, 0], [0, 2, 3]]]
    assert drained.version == 5
    assert moves == [Move(0, 0, 0, 0, -1, "drop"), Move(0, 0, 1, 1, -1, "move"), Move(0, 1, 0, 2, 1, "move")]

    removed = remove_group(drained, 0)
    assert removed.physical_to_logical.tolist() == [[[1, 3, 0], [0, 2, 3]]] and removed.version == 6

    survivors, moves, lost = lose_group(grown, 0, LOAD, LIMITS, _nodes(3))
    assert torch.equal(survivors.physical_to_logical, removed.physical_to_logical) and survivors.version == 5
    assert moves == [Move(0, 0, 0, 2, 1, "reload")] and lost == [(0, 1)]

    with pytest.raises(PlanError, match=r"drain group 1: 1 slot\(s\) missing: layer 0 needs 1 more"):
        drain(current, 1, LOAD, LIMITS, _nodes(2))


# --- grow ------------------------------------------------------------------------------------------------


def test_grow_moves_experts_off_the_full_group_into_the_new_one():
    # g0 = 4, g1 = 4, a new g2 (mean 8/3): serving groups only lose experts, g2 loads every one it gets
    current = _plan([[[0, 1, 2, 3], [4, 5, 6, 7]]], 8)
    grown, moves = grow(current, 1, torch.ones(1, 8), dataclasses.replace(LIMITS, max_replicas_per_expert=1),
                        _nodes(3))
    old, new = current.physical_to_logical[:, :2], grown.physical_to_logical[:, :2]
    assert ((new == old) | (new == -1)).all()
    assert all(m.group == 2 for m in moves if m.is_load) and any(m.kind == "move" for m in moves)
    assert (grown.physical_to_logical[0, 2] >= 0).sum() == 2  # it took two: loads [3, 3, 2]
    assert sorted(grown.group_load(torch.ones(1, 8))[0].tolist()) == [2.0, 3.0, 3.0]


def test_grow_does_not_pile_hot_copies_onto_the_new_group():
    """Zipf load on the contiguous default: the new group takes copies only while that lowers the
    busiest group (it could not hand them back: the serving groups are closed)."""
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(64) for _ in range(2)]) + 1
    load = torch.tensor(1000.0 * ranks ** -1.1 / (ranks ** -1.1).sum(-1, keepdims=True))
    current = PlacementPlan.default(2, 64, 8, redundant_slots=1)
    limits = dataclasses.replace(LIMITS, max_replicas_per_expert=4, target_imbalance=1.1)
    for new_groups, most in ((1, 0.7), (2, 0.55)):  # splits that lift the new group above the rest: ~0.95, ~0.63
        grown, _ = grow(current, new_groups, load, limits, _nodes(8 + new_groups))
        assert (grown.group_load(load).amax(-1) < most * current.group_load(load).amax(-1)).all()


def test_grow_an_idle_layer_still_fills_the_new_group():
    """No tokens in the window (an admin scale-out at night): every expert counts as equally hot."""
    current = _plan([[[0, 1, 2, 3], [4, 5, 6, 7]]], 8)
    grown, moves = grow(current, 2, torch.zeros(1, 8), LIMITS, _nodes(4))
    assert (grown.physical_to_logical[0, 2:] >= 0).any(-1).all()
    assert all(m.group >= 2 for m in moves if m.is_load)


def test_grow_respects_the_replica_cap_and_pins():
    current = _plan([[[0, 1, -1], [2, 3, -1]]])
    capped = dataclasses.replace(LIMITS, max_replicas_per_expert=1, pinned=frozenset({(0, 0, 0)}))
    grown, _ = grow(current, 1, LOAD, capped, _nodes(3))
    assert (grown.replica_count <= 1).all() and grown.physical_to_logical[0, 0, 0] == 0


@pytest.mark.parametrize("bad, match", [
    (dict(new_groups=0), "new_groups must be a positive int, got 0"),
    (dict(new_groups=1.0), "new_groups must be a positive int, got 1.0"),
    (dict(topology=Topology((0, 1))), "topology names 2 groups, the grown pool .G=2 \\+ 1. has 3"),
    (dict(load=torch.ones(1, 3)), "load has shape \\(1, 3\\), expected \\[layers=1, experts=4\\]"),
    (dict(load=-torch.ones(1, 4)), "finite and >= 0"),
])
def test_grow_bad_inputs(bad, match):
    args = dict(plan=_plan([[[0, 1], [2, 3]]]), new_groups=1, load=LOAD, limits=LIMITS, topology=_nodes(3))
    args.update(bad)
    with pytest.raises(PlanError, match=match):
        grow(**args)


def test_planner_never_loads_into_a_closed_group():
    """The hook grow relies on: closed groups may lose copies but receive none (no split, move or swap)."""
    current = _plan([[[0, 1, -1], [2, 3, -1]]])
    closed = dataclasses.replace(LIMITS, max_moves=10, closed_groups=frozenset({1}))
    new, moves = plan(torch.tensor([[6.0, 1.0, 1.0, 1.0]]), current, _nodes(2), closed)
    assert all(m.group != 1 for m in moves if m.is_load)
    full = _plan([[[0, 1, 2, 3], [4, 5, 6, 7]]], 8)  # only a swap could help; it would load into group 1
    assert plan(torch.tensor([[2.0, 2, 1, 1, 1, 1, 1, 1]]), full, _nodes(2), closed) == (full, [])
    with pytest.raises(ValueError, match=r"closed_groups \[5\] are outside the plan's 2 groups"):
        plan(LOAD, current, _nodes(2), dataclasses.replace(LIMITS, closed_groups=frozenset({5})))


# --- drain, remove_group ---------------------------------------------------------------------------------


def test_drain_puts_sole_copies_where_they_balance_best():
    # group 2 holds 4 (sole, load 4) and 5 (sole, load 1); g0 = 3 with a free slot, g1 = 1 with a free slot
    current = _plan([[[0, 1, -1], [2, 3, -1], [4, 5, -1]]], 6)
    load = torch.tensor([[2.0, 1.0, 0.5, 0.5, 4.0, 1.0]])
    drained, moves = drain(current, 2, load, LIMITS, _nodes(3))
    assert drained.physical_to_logical.tolist() == [[[0, 1, 5], [2, 3, 4], [-1, -1, -1]]]
    assert drained.group_load(load).tolist() == [[4.0, 5.0, 0.0]]
    assert [m.kind for m in moves] == ["move", "move", "move", "move"]


def test_drain_overwrites_a_surplus_copy_but_never_a_pinned_one():
    # expert 3 (sole, in g2) must go over a surplus copy; 0 and 2 are cold (0.5 a copy), 1 is hot (2 a copy)
    current = _plan([[[0, 1, 2], [1, 0, 2], [3, -1, -1]]])
    load = torch.tensor([[1.0, 4.0, 1.0, 1.0]])
    drained, moves = drain(current, 2, load, LIMITS, _nodes(3))
    assert drained.physical_to_logical[0, :2].tolist() == [[3, 1, 2], [1, 0, 2]]  # loads [3.5, 3.5]
    assert Move(0, 0, 0, 0, 3, "move") in moves
    cold_pinned = dataclasses.replace(LIMITS, pinned=frozenset({(0, 0, 0), (0, 0, 2), (0, 1, 0), (0, 1, 2)}))
    drained, _ = drain(current, 2, load, cold_pinned, _nodes(3))
    assert drained.physical_to_logical[0, :2].tolist() == [[0, 3, 2], [1, 0, 2]]  # only the hot 1 could give way


def test_drain_with_no_room_names_the_missing_slots():
    current = _plan([[[0, 1], [2, 3]], [[0, 1], [2, 3]]])
    with pytest.raises(PlanError, match=r"drain group 0: 4 slot\(s\) missing: layer 0 needs 2 more, "
                                        r"layer 1 needs 2 more .experts whose only copy is in group 0"):
        drain(current, 0, torch.ones(2, 4), LIMITS, _nodes(2))
    current = _plan([[[1, -1], [0, 2], [0, 3]]])  # expert 1 can only go over a surplus copy of 0
    drained, _ = drain(current, 0, LOAD, dataclasses.replace(LIMITS, pinned=frozenset({(0, 1, 0)})), _nodes(3))
    assert drained.physical_to_logical.tolist() == [[[-1, -1], [0, 2], [1, 3]]]
    both = dataclasses.replace(LIMITS, pinned=frozenset({(0, 1, 0), (0, 2, 0)}))
    with pytest.raises(PlanError, match=r"drain group 0: 1 slot\(s\) missing"):
        drain(current, 0, LOAD, both, _nodes(3))


def test_remove_group_renumbers_the_groups_after_it():
    current = _plan([[[0, 1], [-1, -1], [2, 3], [1, 0]]], version=7)
    removed = remove_group(current, 1)
    assert removed.physical_to_logical.tolist() == [[[0, 1], [2, 3], [1, 0]]] and removed.version == 8


@pytest.mark.parametrize("group, match", [
    (0, r"group 0 still holds expert 0 .layer 0 slot 0; 2 slot\(s\) in all.: drain it before removing it"),
    (4, "group 4 does not exist .the plan has 4 groups."),
    (-1, "group -1 does not exist"),
])
def test_remove_group_errors(group, match):
    with pytest.raises(PlanError, match=match):
        remove_group(_plan([[[0, 1], [-1, -1], [2, 3], [1, 0]]]), group)


# --- lose_group ------------------------------------------------------------------------------------------


def test_lose_group_serves_replicas_and_reloads_sole_copies():
    # group 1 dies: expert 0 lives on in group 0; expert 3's only copy is gone -> reloaded into g2's free slot
    current = _plan([[[0, 1, -1], [0, 3, -1], [2, -1, -1]]], version=2)
    load = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    survivors, moves, lost = lose_group(current, 1, load, LIMITS, _nodes(3))
    assert survivors.physical_to_logical.tolist() == [[[0, 1, -1], [2, 3, -1]]] and survivors.version == 3
    assert moves == [Move(0, 1, 1, -1, 3, "reload")] and lost == [(0, 3)]  # old group 2 is now group 1


def test_lose_group_nothing_lost_when_every_expert_has_a_replica():
    current = PlacementPlan.default(2, 4, 2, redundant_slots=2)  # every expert in both groups
    survivors, moves, lost = lose_group(current, 0, torch.ones(2, 4), LIMITS, _nodes(2))
    assert (moves, lost) == ([], []) and survivors.num_groups == 1


def test_lose_group_without_room_says_restart():
    with pytest.raises(PlanError, match=r"lost group 1: 2 slot\(s\) missing: .*; restart a group instead"):
        lose_group(_plan([[[0, 1], [2, 3]]]), 1, LOAD, LIMITS, _nodes(2))
    with pytest.raises(PlanError, match="group 0 was the only expert group"):
        lose_group(_plan([[[0, 1, 2, 3]]]), 0, LOAD, LIMITS, _nodes(1))


def test_drain_candidate_prefers_few_sole_copies_then_light_then_last():
    grown = _plan([[[0, 1, -1], [2, 3, 0], [0, 2, 3]]])
    assert drain_candidate(grown, LOAD) == 2  # groups 1 and 2 hold no sole copy and carry 4 each
    assert drain_candidate(_plan([[[0, 1, 2], [3, 0, 1]]]), torch.tensor([[1.0, 1.0, 5.0, 1.0]])) == 1  # lighter
    few_sole = _plan([[[0, 1], [2, 3], [0, 2]]])  # g2 carries 5.5 to g0's 1.5 but holds no sole copy
    assert drain_candidate(few_sole, torch.tensor([[1.0, 1.0, 10.0, 1.0]])) == 2


# --- properties, seeded random loops ---------------------------------------------------------------------


def random_case(seed):
    rng = np.random.default_rng(seed)
    num_layers, num_groups, slots = 3, int(rng.integers(2, 6)), int(rng.integers(2, 6))
    num_experts = int(rng.integers(2, num_groups * slots + 1))
    current = random_plan(rng, num_layers, num_experts, num_groups, slots, fill=0.5)
    load = torch.tensor(np.exp(rng.normal(0, 1.5, (num_layers, num_experts))) * 100)
    load[0, : rng.integers(0, num_experts + 1)] = 0  # idle experts, sometimes a whole idle layer
    pins = {(int(rng.integers(num_layers)), int(rng.integers(num_groups)), int(rng.integers(num_experts)))
            for _ in range(rng.integers(0, 4))}
    limits = dataclasses.replace(LIMITS, max_replicas_per_expert=int(rng.integers(1, num_groups + 2)),
                                 target_imbalance=float(rng.choice([1.0, 1.1])), pinned=frozenset(pins))
    return rng, current, load, limits


def assert_valid(plan_: PlacementPlan, num_experts: int):
    """Every expert has a copy in every layer; no group holds two (checked from scratch)."""
    for layer in plan_.physical_to_logical.tolist():
        assert {e for group in layer for e in group} - {-1} == set(range(num_experts))
        for group in layer:
            ids = [e for e in group if e >= 0]
            assert len(ids) == len(set(ids))


def sole_copies(current: PlacementPlan, group: int) -> list[tuple[int, int]]:
    return sorted((layer, e) for layer in range(current.num_layers)
                  for e in current.physical_to_logical[layer, group].tolist()
                  if e >= 0 and int(current.replica_count[layer, e]) == 1)


@pytest.mark.parametrize("seed", range(40))
def test_grow_properties(seed):
    rng, current, load, limits = random_case(seed)
    new_groups = int(rng.integers(1, 3))
    topology = Topology(tuple(rng.integers(0, 3, current.num_groups + new_groups).tolist()))
    grown, moves = grow(current, new_groups, load, limits, topology)
    num_groups = current.num_groups
    assert grown.physical_to_logical.shape == (current.num_layers, num_groups + new_groups, current.slots_per_group)
    assert_valid(grown, current.num_experts)
    old, kept = current.physical_to_logical, grown.physical_to_logical[:, :num_groups]
    assert ((kept == old) | (kept == -1)).all()  # serving groups only give copies up
    assert all(m.group >= num_groups for m in moves if m.is_load)
    cap = torch.maximum(current.replica_count, torch.tensor(limits.max_replicas_per_expert))
    assert (grown.replica_count <= cap).all()
    for layer, group, expert in limits.pinned:
        if expert in old[layer, group].tolist():
            assert expert in grown.physical_to_logical[layer, group].tolist()
    diff = sorted((m.layer, m.group, m.slot, m.old_expert, m.new_expert) for m in moves)
    wider = torch.cat([old, torch.full((current.num_layers, new_groups, current.slots_per_group), -1)], 1)
    p2l = grown.physical_to_logical
    assert diff == [(l, g, s, int(wider[l, g, s]), int(p2l[l, g, s])) for l, g, s in (p2l != wider).nonzero().tolist()]
    assert grown.version == current.version + 1
    before, after = current.group_load(load).amax(-1), grown.group_load(load).amax(-1)  # [L]
    assert (after <= before * (1 + 1e-9)).all()  # the busiest group never gets busier


@pytest.mark.parametrize("seed", range(40))
def test_drain_and_remove_properties(seed):
    rng, current, load, limits = random_case(seed)
    group = int(rng.integers(current.num_groups))
    try:
        drained, moves = drain(current, group, load, limits, Topology(tuple(range(current.num_groups))))
    except PlanError as err:
        assert "slot(s) missing" in str(err)
        return
    assert drained.physical_to_logical.shape == current.physical_to_logical.shape
    assert (drained.physical_to_logical[:, group] == -1).all()
    assert_valid(drained, current.num_experts)
    old, new = current.physical_to_logical, drained.physical_to_logical
    for layer, g, expert in limits.pinned:  # pinned copies outside the drained group stay
        if g != group and expert in old[layer, g].tolist():
            assert expert in new[layer, g].tolist()
    loads = sorted((m.layer, m.new_expert) for m in moves if m.is_load)
    assert loads == sole_copies(current, group)  # exactly the sole copies load, once each
    diff = sorted((m.layer, m.group, m.slot, m.old_expert, m.new_expert) for m in moves)
    assert diff == [(l, g, s, int(old[l, g, s]), int(new[l, g, s])) for l, g, s in (new != old).nonzero().tolist()]
    removed = remove_group(drained, group)
    keep = [g for g in range(current.num_groups) if g != group]
    assert torch.equal(removed.physical_to_logical, new[:, keep]) and removed.version == current.version + 2
    assert_valid(removed, current.num_experts)


@pytest.mark.parametrize("seed", range(40))
def test_lose_group_properties(seed):
    rng, current, load, limits = random_case(seed)
    group = int(rng.integers(current.num_groups))
    topology = Topology(tuple(range(current.num_groups)))
    try:
        survivors, moves, lost = lose_group(current, group, load, limits, topology)
    except PlanError as err:
        with pytest.raises(PlanError):  # no room to lose it means no room to drain it
            drain(current, group, load, limits, topology)
        assert "restart a group instead" in str(err)
        return
    assert survivors.num_groups == current.num_groups - 1 and survivors.version == current.version + 1
    assert_valid(survivors, current.num_experts)
    assert lost == sole_copies(current, group)
    assert sorted((m.layer, m.new_expert) for m in moves) == lost and all(m.kind == "reload" for m in moves)
    keep = [g for g in range(current.num_groups) if g != group]
    before, after = current.physical_to_logical[:, keep], survivors.physical_to_logical
    changed = sorted((l, g, s) for l, g, s in (after != before).nonzero().tolist())
    assert changed == sorted((m.layer, m.group, m.slot) for m in moves)  # survivors change only where they reload
    drained, _ = drain(current, group, load, limits, topology)  # failure = drain + remove, in one go
    assert torch.equal(remove_group(drained, group).physical_to_logical, after)
