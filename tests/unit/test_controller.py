"""Controller (policy + trigger + planner on snapshots, no Ray) and operator moves."""

import pytest
import torch

from moeray.actors.load import LoadTracker
from moeray.actors.placement import PlacementPlan, PlanError
from moeray.autoscaler.controller import Controller
from moeray.autoscaler.manual import manual_migrate
from moeray.autoscaler.policy import parse_policy

POLICY = parse_policy("trigger: {imbalance: 1.3, stabilization_s: 0, cooldown_s: 100}\ntarget: {imbalance: 1.1}\n"
                      "budget: {max_experts_per_round: 2, round_spacing_s: 0}\nload: {min_tokens_per_layer: 10}\n"
                      "replication: {max_replicas_per_expert: 2}\n")


def _snapshot(plan: PlacementPlan, per_layer_counts: list[list[int]]):
    tracker = LoadTracker(plan.num_layers, plan.num_experts, clock=lambda: 0.0)
    for layer, counts in enumerate(per_layer_counts):
        ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        tracker.add(layer, ids.view(-1, 1))
    tracker.end_step()
    return tracker.snapshot(plan)


def test_skewed_load_gets_rounds_until_balanced_then_cooldown():
    plan = PlacementPlan(torch.tensor([[[0, 1, -1], [2, 3, -1]]]), 4)  # a spare slot per group, no replicas yet
    hot = [[600, 200, 100, 100]]  # group 0 carries 800 of 1000 tokens: imbalance 1.6
    controller = Controller(POLICY, bytes_per_expert=1000, group_nodes=[0, 1])
    decision, new_plan = controller.tick(_snapshot(plan, hot), plan, now=0)
    assert decision.action == "migrate" and new_plan is not None
    assert decision.imbalance == pytest.approx(1.6)
    assert decision.imbalance_after < decision.imbalance
    assert new_plan.version == plan.version + 1
    assert 0 < sum(m["new_expert"] >= 0 for m in decision.moves) <= 2 and decision.bytes <= 2000
    plan = new_plan
    for now in (1, 2, 3):  # further rounds until the target or no move helps
        decision, new_plan = controller.tick(_snapshot(plan, hot), plan, now=now)
        if new_plan is None:
            break
        plan = new_plan
    assert decision.action == "done" and controller.state.phase == "cooldown"
    assert float(plan.imbalance(torch.tensor(hot, dtype=torch.float64)).max()) <= 1.3
    assert controller.tick(_snapshot(plan, hot), plan, now=50)[0].reason.startswith("cooldown")


def test_dry_run_decides_but_returns_no_plan_and_busy_holds():
    plan = PlacementPlan(torch.tensor([[[0, 1, -1], [2, 3, -1]]]), 4)
    dry = Controller(POLICY.model_copy(update={"dry_run": True}), 1000, [0, 1])
    decision, new_plan = dry.tick(_snapshot(plan, [[600, 200, 100, 100]]), plan, now=0)
    assert decision.action == "dry_run" and new_plan is None and decision.moves
    busy = Controller(POLICY, 1000, [0, 1]).tick(_snapshot(plan, [[600, 200, 100, 100]]), plan,
                                                  busy="plan v3 is still staging", now=0)
    assert busy[0].action == "hold" and busy[0].reason == "plan v3 is still staging" and busy[1] is None


def test_balanced_load_holds():
    plan = PlacementPlan.default(1, 4, 2)
    decision, new_plan = Controller(POLICY, 1000, [0, 1]).tick(_snapshot(plan, [[100, 100, 100, 100]]), plan, now=0)
    assert (decision.action, new_plan) == ("hold", None) and decision.reason.startswith("balanced")


def test_manual_migrate_replicates_moves_and_refuses_clearly():
    plan = PlacementPlan(torch.tensor([[[0, 1, -1], [2, 3, -1]]]), 4, version=4)
    replicated = manual_migrate(plan, layer=0, expert=0, to_group=1)
    assert replicated.physical_to_logical.tolist() == [[[0, 1, -1], [2, 3, 0]]] and replicated.version == 5
    moved = manual_migrate(plan, 0, 1, to_group=1, from_group=0)
    assert moved.physical_to_logical.tolist() == [[[0, -1, -1], [2, 3, 1]]]
    with pytest.raises(PlanError, match="group 1 already holds expert 2"):
        manual_migrate(plan, 0, 2, to_group=1)
    with pytest.raises(PlanError, match="group 1 has no free slot in MoE layer 0"):
        manual_migrate(replicated, 0, 1, to_group=1)
    with pytest.raises(PlanError, match="group 1 holds no copy of expert 0"):
        manual_migrate(plan, 0, 0, to_group=1, from_group=1)
    with pytest.raises(PlanError, match="expert 7 is out of range"):
        manual_migrate(plan, 0, 7, to_group=1)
    dropped = manual_migrate(replicated, 0, 0, from_group=0)
    assert dropped.physical_to_logical.tolist() == [[[-1, 1, -1], [2, 3, 0]]] and dropped.version == 6
    with pytest.raises(PlanError, match="the only copy of expert 1"):
        manual_migrate(plan, 0, 1, from_group=0)
    with pytest.raises(PlanError, match="name to_group"):
        manual_migrate(plan, 0, 1)
