"""`PlacementPlan`: derived tables, the default layout, validation, JSON, diffs (pure, no Ray)."""

import json

import pytest
import torch

from moeray.actors.placement import PlacementPlan, PlanError

# The worked example of actors/placement.py: E=4, G=2, S=3, one layer.
EXAMPLE = [[[0, 1, 2], [2, 3, 0]]]


def layer_of(plan: PlacementPlan, layer: int = 0) -> list[list[int]]:
    return plan.physical_to_logical[layer].tolist()


def assert_valid(plan: PlacementPlan) -> None:
    """The rules of a plan, checked from scratch (not through the module's own checker)."""
    p2l = plan.physical_to_logical
    for layer in range(plan.num_layers):
        for group in range(plan.num_groups):
            ids = [e for e in p2l[layer, group].tolist() if e >= 0]
            assert len(ids) == len(set(ids)), f"layer {layer} group {group} holds a duplicate: {ids}"
        present = {e for e in p2l[layer].flatten().tolist() if e >= 0}
        assert present == set(range(plan.num_experts)), f"layer {layer} places {sorted(present)}"


# --- the worked example ------------------------------------------------------------------------


def test_worked_example_derived_tables():
    plan = PlacementPlan(torch.tensor(EXAMPLE), num_experts=4)
    assert (plan.num_layers, plan.num_groups, plan.slots_per_group) == (1, 2, 3)
    assert plan.version == 0
    assert plan.physical_to_logical.dtype == torch.long
    assert plan.replica_count.tolist() == [[2, 1, 2, 1]]
    assert plan.logical_to_physical.tolist() == [[[0, 5], [1, -1], [2, 3], [4, -1]]]


def test_logical_to_physical_inverts_physical_to_logical():
    plan = PlacementPlan.default(3, 8, 3, redundant_slots=2)
    flat = plan.physical_to_logical.view(plan.num_layers, -1)  # [L, G*S]
    for layer in range(plan.num_layers):
        for expert in range(plan.num_experts):
            ids = plan.logical_to_physical[layer, expert].tolist()
            count = int(plan.replica_count[layer, expert])
            assert ids[count:] == [-1] * (len(ids) - count)
            assert ids[:count] == sorted(ids[:count])
            assert ids[:count] == (flat[layer] == expert).nonzero().flatten().tolist()


def test_accepts_nested_lists():
    assert PlacementPlan(EXAMPLE, 4) == PlacementPlan(torch.tensor(EXAMPLE), 4)


# --- default -----------------------------------------------------------------------------------


def test_default_even_blocks_no_redundancy():
    plan = PlacementPlan.default(num_layers=2, num_experts=8, num_groups=2, redundant_slots=0)
    assert plan.physical_to_logical.shape == (2, 2, 4)
    for layer in range(2):
        assert layer_of(plan, layer) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan.replica_count.tolist() == [[1] * 8] * 2
    assert plan.logical_to_physical.shape == (2, 8, 1)


def test_default_uneven_blocks():
    plan = PlacementPlan.default(num_layers=1, num_experts=6, num_groups=4)
    assert plan.slots_per_group == 2
    assert_valid(plan)
    # Contiguous blocks 2, 2, 1, 1 (first groups take the extra expert) ...
    blocks, start = [], 0
    for group, size in enumerate([2, 2, 1, 1]):
        assert layer_of(plan)[group][:size] == list(range(start, start + size))
        blocks.append(size)
        start += size
    assert max(blocks) - min(blocks) <= 1 and min(blocks) >= 1
    # ... and the padding slot of the short groups holds a replica of the least-replicated, lowest-id
    # expert the group lacks (memory for S slots is allocated per group anyway).
    assert layer_of(plan) == [[0, 1], [2, 3], [4, 0], [5, 1]]
    assert plan.replica_count.tolist() == [[2, 2, 1, 1, 1, 1]]


@pytest.mark.parametrize("num_experts,num_groups", [(6, 4), (7, 3), (5, 5), (9, 2), (16, 6)])
def test_default_blocks_differ_by_at_most_one(num_experts, num_groups):
    plan = PlacementPlan.default(1, num_experts, num_groups)
    assert_valid(plan)
    firsts = [row[0] for row in layer_of(plan)]
    sizes = [b - a for a, b in zip(firsts, firsts[1:] + [num_experts])]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sorted(sizes, reverse=True) == sizes  # the larger blocks come first
    for group, size in enumerate(sizes):
        assert layer_of(plan)[group][:size] == list(range(firsts[group], firsts[group] + size))


def test_default_fills_redundant_slots_with_replicas():
    plan = PlacementPlan.default(num_layers=2, num_experts=8, num_groups=3, redundant_slots=2)
    assert plan.slots_per_group == 3 + 2
    assert_valid(plan)
    # Blocks [0,1,2] [3,4,5] [6,7]; then, group by group, the least-replicated lowest-id expert
    # the group does not hold: g0 takes 3, 4; g1 takes 0, 1; g2 takes 2, 5 (the last with one
    # copy), then 0 (every candidate has two; lowest id wins).
    expected = [[0, 1, 2, 3, 4], [3, 4, 5, 0, 1], [6, 7, 2, 5, 0]]
    assert layer_of(plan, 0) == expected and layer_of(plan, 1) == expected
    assert plan.replica_count.tolist() == [[3, 2, 2, 2, 2, 2, 1, 1]] * 2
    assert (plan.physical_to_logical >= 0).all()


def test_default_never_duplicates_inside_a_group():
    for num_experts, num_groups, redundant in [(4, 2, 3), (3, 3, 4), (8, 4, 7), (5, 2, 10)]:
        plan = PlacementPlan.default(1, num_experts, num_groups, redundant)
        assert_valid(plan)
        # A group can hold each expert at most once, so slots beyond E stay empty.
        for row in layer_of(plan):
            filled = [e for e in row if e >= 0]
            assert len(filled) == min(len(row), num_experts)


def test_default_single_group_has_no_candidate_for_redundant_slots():
    plan = PlacementPlan.default(num_layers=1, num_experts=4, num_groups=1, redundant_slots=2)
    assert layer_of(plan) == [[0, 1, 2, 3, -1, -1]]
    assert plan.replica_count.tolist() == [[1, 1, 1, 1]]


def test_default_carries_version():
    assert PlacementPlan.default(1, 4, 2, version=7).version == 7


@pytest.mark.parametrize("args", [(1, 4, 5), (1, 4, 0), (1, 4, 2, -1), (0, 4, 2)])
def test_default_rejects_impossible_layouts(args):
    with pytest.raises(PlanError):
        PlacementPlan.default(*args)


def test_default_more_groups_than_experts_names_both():
    with pytest.raises(PlanError, match=r"num_groups=5.*4 experts"):
        PlacementPlan.default(1, 4, 5)


# --- validation --------------------------------------------------------------------------------


def test_rejects_expert_id_out_of_range():
    with pytest.raises(PlanError, match=r"layer 1 group 1 slot 0: expert id 4 is out of range \[-1, 4\)"):
        PlacementPlan(torch.tensor([EXAMPLE[0], [[0, 1, 2], [4, 3, -1]]]), 4)
    with pytest.raises(PlanError, match=r"layer 0 group 0 slot 2: expert id -2"):
        PlacementPlan(torch.tensor([[[0, 1, -2], [2, 3, -1]]]), 4)


def test_rejects_expert_without_replica():
    with pytest.raises(PlanError, match=r"layer 1: logical expert 3 has no replica"):
        PlacementPlan(torch.tensor([EXAMPLE[0], [[0, 1, 2], [2, -1, 0]]]), 4)


def test_rejects_expert_twice_in_one_group():
    with pytest.raises(PlanError, match=r"layer 0 group 1: expert 2 appears twice"):
        PlacementPlan(torch.tensor([[[0, 1, 3], [2, 3, 2]]]), 4)


@pytest.mark.parametrize("shape", [(4,), (2, 2), (1, 1, 2, 2)])
def test_rejects_wrong_rank(shape):
    with pytest.raises(PlanError, match=r"\[layers, groups, slots\]"):
        PlacementPlan(torch.zeros(shape, dtype=torch.long), 1)


@pytest.mark.parametrize("shape", [(0, 2, 2), (1, 0, 2), (1, 2, 0)])
def test_rejects_empty_dimension(shape):
    with pytest.raises(PlanError, match="at least one layer, group and slot"):
        PlacementPlan(torch.zeros(shape, dtype=torch.long), 1)


def test_rejects_non_integer_tensor():
    with pytest.raises(PlanError, match="integer expert ids"):
        PlacementPlan(torch.tensor([[[0.0, 1.5], [2.0, 3.0]]]), 4)


def test_rejects_bad_num_experts():
    with pytest.raises(PlanError, match="num_experts"):
        PlacementPlan(torch.full((1, 2, 2), -1), 0)


def test_plan_is_frozen():
    plan = PlacementPlan(torch.tensor(EXAMPLE), 4)
    with pytest.raises(AttributeError):
        plan.version = 1


# --- JSON --------------------------------------------------------------------------------------


def test_json_round_trip():
    plan = PlacementPlan.default(3, 8, 3, redundant_slots=2, version=5)
    data = json.loads(plan.to_json())
    assert set(data) == {"version", "num_groups", "slots_per_group", "physical_to_logical"}
    assert data["version"] == 5 and data["num_groups"] == 3 and data["slots_per_group"] == 5
    assert data["physical_to_logical"] == plan.physical_to_logical.tolist()
    back = PlacementPlan.from_json(plan.to_json(), num_experts=8)
    assert back == plan
    assert torch.equal(back.replica_count, plan.replica_count)
    assert torch.equal(back.logical_to_physical, plan.logical_to_physical)
    assert PlacementPlan.from_json(plan.to_json()) == plan  # E inferred from the largest id


def plan_json(**overrides) -> str:
    data = {"version": 1, "num_groups": 2, "slots_per_group": 3, "physical_to_logical": EXAMPLE}
    data.update(overrides)
    return json.dumps(data)


def test_from_json_bad_json():
    with pytest.raises(PlanError, match="not valid JSON"):
        PlacementPlan.from_json('{"version": 1,')


def test_from_json_not_an_object():
    with pytest.raises(PlanError, match="must be an object, got list"):
        PlacementPlan.from_json("[1, 2]")
    with pytest.raises(PlanError, match="must be an object, got int"):
        PlacementPlan.from_json("3")


@pytest.mark.parametrize("key", ["version", "num_groups", "slots_per_group", "physical_to_logical"])
def test_from_json_missing_key(key):
    data = json.loads(plan_json())
    del data[key]
    with pytest.raises(PlanError, match=f"no '{key}'"):
        PlacementPlan.from_json(json.dumps(data))


@pytest.mark.parametrize("overrides", [{"num_groups": 3}, {"slots_per_group": 2}, {"num_groups": 1, "slots_per_group": 6},
                                       {"physical_to_logical": [[0, 1, 2], [2, 3, 0]]}])
def test_from_json_shape_mismatch(overrides):
    with pytest.raises(PlanError, match=r"has shape .* expected \[layers, \d+, \d+\]"):
        PlacementPlan.from_json(plan_json(**overrides))


@pytest.mark.parametrize("bad,where", [(1.5, r"\[0\]\[0\]\[1\] is 1\.5"), (1.0, r"\[0\]\[0\]\[1\] is 1\.0"),
                                       (True, r"\[0\]\[0\]\[1\] is True"), ("1", r"\[0\]\[0\]\[1\] is '1'"),
                                       (None, r"\[0\]\[0\]\[1\] is None")])
def test_from_json_non_int_entries(bad, where):
    # 1.5 and True used to be truncated / cast silently to expert 1.
    p2l = [[[0, bad, 2], [2, 3, 0]]]
    with pytest.raises(PlanError, match="physical_to_logical" + where):
        PlacementPlan.from_json(plan_json(physical_to_logical=p2l))


def test_from_json_ragged():
    with pytest.raises(PlanError, match="list of ints"):
        PlacementPlan.from_json(plan_json(physical_to_logical=[[[0, 1, 2], [2, 3]]]))


@pytest.mark.parametrize("key,value", [("version", "1"), ("version", 1.7), ("num_groups", "2"), ("slots_per_group", None)])
def test_from_json_non_int_header(key, value):
    with pytest.raises(PlanError, match=f"'{key}' must be an int"):
        PlacementPlan.from_json(plan_json(**{key: value}))


def test_from_json_validates_the_plan():
    with pytest.raises(PlanError, match="layer 0 group 1: expert 2 appears twice"):
        PlacementPlan.from_json(plan_json(physical_to_logical=[[[0, 1, 3], [2, 3, 2]]]))
    with pytest.raises(PlanError, match="num_experts"):  # nothing placed at all
        PlacementPlan.from_json(plan_json(physical_to_logical=[[[-1] * 3] * 2]))


def test_from_json_uses_the_models_num_experts():
    # Expert 4 of a 5-expert model is missing: only the model's E can tell.
    text = plan_json()
    assert PlacementPlan.from_json(text).num_experts == 4
    plan = PlacementPlan.from_json(text, num_experts=4)
    assert plan.num_experts == 4 and plan.version == 1
    with pytest.raises(PlanError, match="layer 0: logical expert 4 has no replica"):
        PlacementPlan.from_json(text, num_experts=5)
    with pytest.raises(PlanError, match="expert id 3 is out of range"):
        PlacementPlan.from_json(text, num_experts=3)


# --- versions, equality, diffs -----------------------------------------------------------------


def test_with_version():
    plan = PlacementPlan(torch.tensor(EXAMPLE), 4, version=2)
    newer = plan.with_version(3)
    assert newer.version == 3 and plan.version == 2
    assert torch.equal(newer.physical_to_logical, plan.physical_to_logical)
    assert newer.num_experts == 4
    assert torch.equal(newer.logical_to_physical, plan.logical_to_physical)
    assert newer != plan and newer.with_version(2) == plan


def test_equality():
    plan = PlacementPlan(torch.tensor(EXAMPLE), 4)
    assert plan == PlacementPlan(torch.tensor(EXAMPLE), 4)
    assert plan != PlacementPlan(torch.tensor(EXAMPLE), 4, version=1)
    assert plan != PlacementPlan(torch.tensor([[[0, 1, 2], [2, 3, 1]]]), 4)
    assert plan != PlacementPlan(torch.tensor([[[0, 1, 2], [2, 3, 4]]]), 5)
    assert plan != PlacementPlan(torch.tensor([[[0, 1], [2, 3]]]), 4)  # other shape: unequal, no error
    assert plan != EXAMPLE and plan != "plan"


def test_changed_slots():
    old = PlacementPlan(torch.tensor([EXAMPLE[0], EXAMPLE[0]]), 4)
    new = PlacementPlan(torch.tensor([[[0, 1, 3], [2, 3, 0]],       # layer 0: g0 s2 2 -> 3
                                      [[1, 0, -1], [2, 3, 1]]]),    # layer 1: g0 s0/s1 swap, s2 emptied; g1 s2 0 -> 1
                        4, version=1)
    assert new.changed_slots(old) == {0: [(0, 2, 3), (1, 0, 1), (1, 1, 0)], 1: [(1, 2, 1)]}
    assert new.changed_slots(new) == {} and new.changed_slots(new.with_version(9)) == {}
    # The other way round: slots that become empty need nothing; the rest needs the old experts back.
    assert old.changed_slots(new) == {0: [(0, 2, 2), (1, 0, 0), (1, 1, 1), (1, 2, 2)], 1: [(1, 2, 0)]}


def test_changed_slots_rejects_other_shapes():
    with pytest.raises(PlanError, match="different shapes"):
        PlacementPlan.default(1, 4, 2).changed_slots(PlacementPlan(torch.tensor(EXAMPLE), 4))
