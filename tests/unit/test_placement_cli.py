"""`moeray policy` and `moeray placement` offline commands: outputs, exit codes and bad input."""

import json

import numpy as np
import pytest

from moeray.actors.placement import PlacementPlan
from moeray.cluster.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_policy_schema_is_json_schema(capsys):
    code, out, _ = _run(capsys, "policy", "schema")
    schema = json.loads(out)
    assert code == 0 and schema["additionalProperties"] is False and "trigger" in schema["properties"]


def test_policy_validate_reports_every_problem_and_exits_non_zero(capsys, tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("trigger: {imbalance: 1.5}\n")
    bad.write_text("trigger:\n  imbalanse: 1.5\nbudget:\n  max_experts_per_round: 0\n")
    code, out, err = _run(capsys, "policy", "validate", str(good), str(bad))
    assert code == 1
    assert f"{good}: ok" in out
    assert f"{bad}:2: trigger.imbalanse: Extra inputs are not permitted" in err
    assert f"{bad}:4: budget.max_experts_per_round: Input should be greater than or equal to 1" in err


def test_policy_validate_against_a_plan(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(PlacementPlan.default(2, 4, 2).to_json())
    policy = tmp_path / "p.yaml"
    policy.write_text("replication: {max_replicas_per_expert: 2}\npinned: [{expert: 3, group: 0}]\n")
    code, _, err = _run(capsys, "policy", "validate", str(policy), "--plan", str(plan))
    assert code == 1 and f"{policy}:2: pinned.0: group 0 holds no copy of expert 3 in MoE layer 0" in err


def test_placement_init_writes_a_valid_plan(capsys, tmp_path):
    out_file = tmp_path / "plan.json"
    code, _, _ = _run(capsys, "placement", "init", "--layers", "3", "--experts", "8", "--groups", "3",
                      "--slots-per-group", "4", "--out", str(out_file))
    plan = PlacementPlan.from_json(out_file.read_text())
    assert code == 0 and tuple(plan.physical_to_logical.shape) == (3, 3, 4) and plan.num_experts == 8
    code, _, err = _run(capsys, "placement", "init", "--layers", "1", "--experts", "8", "--groups", "2",
                        "--slots-per-group", "3")
    assert code == 2 and "--slots-per-group 3 is too few" in err


def test_placement_plan_what_if(capsys, tmp_path):
    current = tmp_path / "plan.json"
    current.write_text(PlacementPlan(np.array([[[0, 1, -1], [2, 3, -1]]] * 2), 4).to_json())
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"load": [[600, 200, 100, 100], [250, 250, 250, 250]]}))
    code, out, _ = _run(capsys, "placement", "plan", "--load", str(load), "--current", str(current), "--json")
    result = json.loads(out)
    assert code == 0 and set(result) >= {"plan", "moves", "imbalance_before", "imbalance_after"}
    assert result["imbalance_after"] < result["imbalance_before"]
    assert result["moves"] and all(m["layer"] == 0 for m in result["moves"])  # layer 1 is balanced already
    new = PlacementPlan.from_json(json.dumps(result["plan"]), 4)
    assert new.version == 1
    npy = tmp_path / "load.npy"
    np.save(npy, np.array([[600, 200, 100, 100], [250, 250, 250, 250]], dtype=np.float64))
    code, out, _ = _run(capsys, "placement", "plan", "--load", str(npy), "--current", str(current))
    assert code == 0 and "move(s)" in out


@pytest.mark.parametrize("load, message", [
    ({"load": [[1, 2, 3]]}, "--load has shape [1, 3], the plan needs [2, 4]"),
    ({"load": [[1, 2, 3, -4], [1, 1, 1, 1]]}, "must be finite token counts >= 0"),
    ({"windows": []}, 'expected {"load": [[...]]}'),
])
def test_placement_plan_bad_load(capsys, tmp_path, load, message):
    current = tmp_path / "plan.json"
    current.write_text(PlacementPlan.default(2, 4, 2).to_json())
    path = tmp_path / "load.json"
    path.write_text(json.dumps(load))
    code, _, err = _run(capsys, "placement", "plan", "--load", str(path), "--current", str(current))
    assert code == 2 and message in err


def test_placement_plan_bad_plan_and_missing_files(capsys, tmp_path):
    load = tmp_path / "load.json"
    load.write_text(json.dumps({"load": [[1, 2, 3, 4]]}))
    broken = tmp_path / "plan.json"
    broken.write_text(json.dumps({"version": 0, "num_groups": 2, "slots_per_group": 2,
                                  "physical_to_logical": [[[0, 0], [1, -1]]]}))
    code, _, err = _run(capsys, "placement", "plan", "--load", str(load), "--current", str(broken))
    assert code == 2 and "layer 0 group 0: expert 0 appears twice" in err
    good = tmp_path / "good.json"
    good.write_text(PlacementPlan.default(1, 4, 2).to_json())
    code, _, err = _run(capsys, "placement", "plan", "--load", str(tmp_path / "nope.json"), "--current", str(good))
    assert code == 2 and "nope.json: no such file" in err


def test_placement_simulate_replays_a_trace(capsys, tmp_path):
    rng = np.random.default_rng(0)
    popularity = np.array([8.0, 4, 2, 1, 1, 1, 1, 1])
    windows = [[list(rng.multinomial(800, popularity / popularity.sum()).astype(float)) for _ in range(2)]
               for _ in range(5)]  # [R=5, L=2, E=8]
    dump = tmp_path / "load.jsonl"  # the `moeray load dump` format: one snapshot per line
    dump.write_text("".join(json.dumps({"window": w, "plan_version": 0}) + "\n" for w in windows))
    policy = tmp_path / "p.yaml"
    policy.write_text("budget: {max_experts_per_round: 2}\n")
    code, out, _ = _run(capsys, "placement", "simulate", "--trace", str(dump), "--policy", str(policy),
                        "--groups", "2", "--bytes-per-expert", "10", "--json")
    result = json.loads(out)
    assert code == 0 and len(result["rounds"]) == 4
    assert all(r["loads"] <= 2 and r["bytes"] == 10 * r["loads"] for r in result["rounds"])
    assert result["summary"]["mean_imbalance_with"] < result["summary"]["mean_imbalance_without"]
    npy = tmp_path / "trace.npy"
    np.save(npy, np.array(windows))
    code, out, _ = _run(capsys, "placement", "simulate", "--trace", str(npy), "--groups", "2")
    assert code == 0 and "4 rounds: mean imbalance" in out
    code, _, err = _run(capsys, "placement", "simulate", "--trace", str(npy))
    assert code == 2 and "--groups" in err
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"window": windows[0]}) + "\n")
    code, _, err = _run(capsys, "placement", "simulate", "--trace", str(one), "--groups", "2")
    assert code == 2 and "at least 2 windows" in err
