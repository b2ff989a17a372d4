"""Placement policy: the example files, every kind of mistake with its line and field path, fit checks, limits."""

from pathlib import Path

import pytest

from moeray.actors.placement import PlacementPlan
from moeray.autoscaler.policy import Policy, PolicyError, check_fits, limits, load_policy, parse_policy, topology

POLICIES = Path(__file__).resolve().parents[2] / "configs" / "policies"


@pytest.mark.parametrize("name", ["default.yaml", "conservative.yaml", "aggressive.yaml"])
def test_example_policies_validate(name):
    policy = load_policy(POLICIES / name)
    assert policy.target.imbalance < policy.trigger.imbalance


def test_default_file_spells_out_the_built_in_defaults():
    """`moeray serve` without --policy uses Policy(); the shipped default.yaml must say the same."""
    assert load_policy(POLICIES / "default.yaml") == Policy()


def test_empty_policy_is_all_defaults():
    assert parse_policy("") == Policy()


def _problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    return str(info.value).splitlines()


@pytest.mark.parametrize("text, expected", [
    ("interval_s: 5\nbudgt:\n  max_experts_per_round: 3\n", "p.yaml:2: budgt: Extra inputs are not permitted"),
    ("budget:\n  round_spacing_s: 1\n  max_expert_per_round: 3\n",
     "p.yaml:3: budget.max_expert_per_round: Extra inputs are not permitted"),
    ("trigger:\n  imbalance: 0.5\n", "p.yaml:2: trigger.imbalance: Input should be greater than or equal to 1"),
    ("load:\n  window_s: soon\n", "p.yaml:2: load.window_s: Input should be a valid number"),
    ("load:\n  source: median\n", "p.yaml:2: load.source: Input should be 'window' or 'ema'"),
    ("pinned:\n  - {expert: 1, group: 0}\n  - {expert: -2, group: 0}\n",
     "p.yaml:3: pinned.1.expert: Input should be greater than or equal to 0"),
    ("pinned:\n  - group: 0\n", "p.yaml:2: pinned.0.expert: Field required"),
    ("layer_overrides:\n  - layers: []\n", "p.yaml:2: layer_overrides.0.layers: List should have at least 1 item"),
    ("budget:\n  max_bytes_per_round: lots\n", "p.yaml:2: budget.max_bytes_per_round: could not parse value and unit"),
    ("scaling:\n  min_groups: 4\n  max_groups: 2\n", "p.yaml:1: scaling: Value error, min_groups (4) is more than max_groups (2)"),
    ("trigger:\n  imbalance: 1.2\ntarget:\n  imbalance: 1.2\n", "must be below trigger.imbalance"),
    ("dry_run: maybe\n", "p.yaml:1: dry_run: Input should be a valid boolean"),
])
def test_each_mistake_is_reported_with_line_and_field(text, expected):
    problems = _problems(text)
    assert any(expected in line for line in problems), problems


def test_every_problem_is_reported_at_once():
    problems = _problems("interval_s: 0\nload:\n  window_s: -1\nbogus: 1\n")
    assert [p.split(": ")[1] for p in problems] == ["interval_s", "load.window_s", "bogus"]
    assert [p.split(":")[1] for p in problems] == ["1", "3", "4"]


def test_yaml_syntax_errors_and_non_mappings():
    assert _problems("load: [1,\n")[0].startswith("p.yaml:")
    assert "must be a mapping" in _problems("- 1\n- 2\n")[0]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PolicyError, match="nope.yaml: no such file"):
        load_policy(tmp_path / "nope.yaml")


def test_check_fits_names_ids_the_running_model_lacks():
    plan = PlacementPlan.default(2, 4, 2, redundant_slots=1)  # group 0: [0, 1, 2], group 1: [2, 3, 0]
    text = "pinned:\n  - {expert: 9, group: 0}\n  - {expert: 1, group: 1, layers: [0]}\nlayer_overrides:\n  - layers: [5]\n"
    policy = parse_policy(text)
    with pytest.raises(PolicyError) as info:
        check_fits(policy, 2, 4, 2, plan.physical_to_logical.tolist(), text, "p.yaml")
    lines = str(info.value).splitlines()
    assert "p.yaml:2: pinned.0.expert: expert 9 does not exist (the model has 4)" in lines
    assert "p.yaml:3: pinned.1: group 1 holds no copy of expert 1 in MoE layer 0" in lines
    assert "p.yaml:5: layer_overrides.0.layers: MoE layer 5 does not exist (the model has 2)" in lines
    check_fits(Policy(), 2, 4, 1, PlacementPlan.default(2, 4, 1).physical_to_logical.tolist())  # 4 copies is a cap
    ok = parse_policy("replication: {max_replicas_per_expert: 2}\npinned: [{expert: 0, group: 1}]\n")
    check_fits(ok, 2, 4, 2, plan.physical_to_logical.tolist())


def test_limits_and_topology_follow_the_policy():
    policy = parse_policy("budget: {max_experts_per_round: 3, max_bytes_per_round: 1KiB}\n"
                          "replication: {max_replicas_per_expert: 2}\ntarget: {imbalance: 1.05}\n"
                          "pinned: [{expert: 1, group: 0, layers: [2]}]\n"
                          "layer_overrides: [{layers: [0], enabled: false}, {layers: [1], trigger_imbalance: 2.0}]\n"
                          "anti_affinity: {nodes: ignore}\n")
    got = limits(policy, num_layers=3, bytes_per_expert=100)
    assert (got.max_moves, got.max_bytes, got.bytes_per_expert) == (3, 1024, 100)
    assert got.max_replicas_per_expert == 2 and got.target_imbalance == 1.05
    assert got.layers == frozenset({1, 2})
    assert got.pinned == frozenset({(2, 0, 1)})
    assert policy.trigger_for(0) is None and policy.trigger_for(1) == 2.0 and policy.trigger_for(2) == 1.3
    assert topology(policy, [0, 0, 1]).group_nodes == (0, 1, 2)
    assert topology(Policy(), [0, 0, 1]).group_nodes == (0, 0, 1)
    assert limits(Policy(), 3, 100).layers is None


def test_json_schema_describes_every_field():
    schema = Policy.model_json_schema()
    sections = [schema, *schema["$defs"].values()]
    undocumented = [f"{s.get('title')}.{name}" for s in sections for name, field in s.get("properties", {}).items()
                    if not field.get("description")]
    assert undocumented == []
