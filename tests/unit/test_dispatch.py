"""Dispatch math: replica choice, rows sorted by (group, slot), and results independent of placement."""

import pytest
import torch

from moeray.actors.dispatch import assign_replicas, dispatch, max_rows_per_group, message_bytes, pack, route, unpack
from moeray.actors.placement import PlacementPlan
from moeray.kernels.moe import expert_ffn, fused_moe_reference, sort_pairs, unpermute

# The example of actors/placement.py and actors/dispatch.py: E=4, G=2, S=3, one layer.
EXAMPLE = PlacementPlan(torch.tensor([[[0, 1, 2], [2, 3, 0]]]), num_experts=4)


def random_plan(num_layers: int, num_experts: int, num_groups: int, slots: int, seed: int) -> PlacementPlan:
    """A valid plan with shuffled experts, random replicas (at most one per group) and empty slots."""
    assert num_groups * slots >= num_experts and slots >= 1
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        groups: list[list[int]] = [[] for _ in range(num_groups)]
        for i, expert in enumerate(torch.randperm(num_experts, generator=gen).tolist()):
            open_groups = [g for g in range(num_groups) if len(groups[g]) < slots]
            groups[open_groups[i % len(open_groups)]].append(expert)
        for members in groups:  # some free slots take a replica, the others stay empty
            while len(members) < slots:
                lacking = [e for e in range(num_experts) if e not in members]
                if not lacking or torch.rand(1, generator=gen).item() < 0.3:
                    members.append(-1)
                else:
                    members.append(lacking[int(torch.randint(len(lacking), (1,), generator=gen))])
            perm = torch.randperm(slots, generator=gen).tolist()
            members[:] = [members[j] for j in perm]
        layers.append(groups)
    return PlacementPlan(torch.tensor(layers), num_experts)


def random_topk(num_tokens: int, top_k: int, num_experts: int, seed: int) -> torch.Tensor:
    """Distinct experts per token, like every router's top-k: [T, K] int64."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])


def round_robin_reference(topk_ids: torch.Tensor, plan: PlacementPlan, layer: int) -> torch.Tensor:
    """The rule, pair by pair: the j-th pair (in t*K + k order) of expert e goes to its replica j % r."""
    seen: dict[int, int] = {}
    out = []
    for expert in topk_ids.flatten().tolist():
        j = seen.get(expert, 0)
        seen[expert] = j + 1
        r = int(plan.replica_count[layer, expert])
        out.append(int(plan.logical_to_physical[layer, expert, j % r]))
    return torch.tensor(out).view_as(topk_ids)


# --- assign_replicas ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_assign_replicas_docstring_example(dtype):
    topk_ids = torch.tensor([[0, 2], [0, 1], [2, 0]], dtype=dtype)
    physical = assign_replicas(topk_ids, EXAMPLE.replica_count[0], EXAMPLE.logical_to_physical[0])
    assert physical.tolist() == [[0, 2], [5, 1], [3, 0]]
    assert physical.dtype == torch.int64


def test_assign_replicas_hand_example_three_replicas():
    # E=3, G=3, S=2: expert 0 in every group (p = 0, 2, 4), expert 1 at p=1, expert 2 at p=3.
    plan = PlacementPlan(torch.tensor([[[0, 1], [0, 2], [0, -1]]]), 3)
    assert plan.logical_to_physical[0].tolist() == [[0, 2, 4], [1, -1, -1], [3, -1, -1]]
    topk_ids = torch.tensor([[1, 0], [0, 2], [0, 1], [2, 0], [0, 1]])
    # Expert 0's pairs in pair order: j = 0..4 -> replicas 0, 1, 2, 0, 1 -> p = 0, 2, 4, 0, 2.
    expected = [[1, 0], [2, 3], [4, 1], [3, 0], [2, 1]]
    physical = assign_replicas(topk_ids, plan.replica_count[0], plan.logical_to_physical[0])
    assert physical.tolist() == expected


def test_assign_replicas_empty_step():
    physical = assign_replicas(torch.zeros(0, 2, dtype=torch.long), EXAMPLE.replica_count[0],
                               EXAMPLE.logical_to_physical[0])
    assert physical.shape == (0, 2)


@pytest.mark.parametrize("seed", range(6))
def test_assign_replicas_random_plans(seed):
    num_layers, num_experts, num_groups, slots, top_k = 3, 10, 4, 5, 3
    plan = random_plan(num_layers, num_experts, num_groups, slots, seed)
    assert (plan.replica_count > 1).any()  # the plan really has replicas to split over
    topk_ids = random_topk(97, top_k, num_experts, seed)
    for layer in range(num_layers):
        physical = assign_replicas(topk_ids, plan.replica_count[layer], plan.logical_to_physical[layer])
        # Deterministic, and exactly the round-robin rule.
        assert torch.equal(physical, assign_replicas(topk_ids.clone(), plan.replica_count[layer],
                                                     plan.logical_to_physical[layer]))
        assert torch.equal(physical, round_robin_reference(topk_ids, plan, layer))
        # Every physical id is a real slot that holds the pair's logical expert.
        assert physical.min() >= 0 and physical.max() < num_groups * slots
        assert torch.equal(plan.physical_to_logical.view(num_layers, -1)[layer][physical], topk_ids)
        # A replicated expert's pairs are split evenly over its replicas.
        for expert in range(num_experts):
            r = int(plan.replica_count[layer, expert])
            replicas = plan.logical_to_physical[layer, expert, :r]
            per_replica = torch.stack([(physical == p).sum() for p in replicas])
            assert int(per_replica.sum()) == int((topk_ids == expert).sum())
            assert int(per_replica.max() - per_replica.min()) <= 1, (expert, per_replica.tolist())


# --- dispatch ----------------------------------------------------------------------------------


def three_plans(num_layers: int, num_experts: int) -> list[PlacementPlan]:
    return [PlacementPlan.default(num_layers, num_experts, 4),
            PlacementPlan.default(num_layers, num_experts, 3, redundant_slots=2),
            random_plan(num_layers, num_experts, 5, 4, seed=11)]


def physical_of_rows(counts: torch.Tensor) -> torch.Tensor:
    """counts [G, S] -> the physical id of each sorted row, [N]."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten())


@pytest.mark.parametrize("plan_index", range(3))
def test_dispatch_sorts_rows_by_group_then_slot(plan_index):
    num_tokens, hidden, top_k, num_experts = 37, 8, 2, 12
    plan = three_plans(2, num_experts)[plan_index]
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(0))
    topk_ids = random_topk(num_tokens, top_k, num_experts, seed=1)
    for layer in range(plan.num_layers):
        rows, counts, handle = dispatch(x, topk_ids, plan, layer)
        physical = assign_replicas(topk_ids, plan.replica_count[layer], plan.logical_to_physical[layer]).flatten()
        assert rows.shape == (num_tokens * top_k, hidden)
        assert counts.shape == (plan.num_groups, plan.slots_per_group)
        assert torch.equal(counts.flatten(), torch.bincount(physical, minlength=counts.numel()))
        assert int(counts.sum()) == num_tokens * top_k
        assert (counts.flatten()[plan.physical_to_logical[layer].flatten() < 0] == 0).all()  # empty slots get nothing
        # Row i is pair handle.order[i]; pairs are sorted by physical id p = g*S + s, stable (pair order within a slot).
        sorted_physical = physical[handle.order]
        assert torch.equal(sorted_physical, physical_of_rows(counts))
        assert (sorted_physical.diff() >= 0).all()
        same_slot = sorted_physical[1:] == sorted_physical[:-1]
        assert (handle.order.diff()[same_slot] > 0).all()
        assert torch.equal(rows, x[handle.order // top_k])
        # Group g's rows are the contiguous run [sum(counts[:g]), sum(counts[:g+1])).
        bounds = torch.cumsum(counts.sum(1), 0).tolist()
        for group, (start, end) in enumerate(zip([0] + bounds[:-1], bounds)):
            assert (sorted_physical[start:end] // plan.slots_per_group == group).all()


def scale_by_logical(rows: torch.Tensor, counts: torch.Tensor, plan: PlacementPlan, layer: int) -> torch.Tensor:
    """An 'expert' per physical slot that depends only on the logical expert it holds: row * (e + 1)."""
    logical = plan.physical_to_logical[layer].flatten()[physical_of_rows(counts)]  # [N]
    assert (logical >= 0).all()
    return rows * (logical + 1).to(rows.dtype).unsqueeze(-1)


def test_dispatch_result_does_not_depend_on_placement():
    num_tokens, hidden, top_k, num_experts, layer = 53, 16, 4, 12, 1
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(num_tokens, hidden, generator=gen)
    topk_weights = torch.rand(num_tokens, top_k, generator=gen)
    topk_ids = random_topk(num_tokens, top_k, num_experts, seed=4)
    # Placement-free reference: pairs in top-k order.
    y = x.unsqueeze(1) * (topk_ids + 1).to(x.dtype).unsqueeze(-1)  # [T, K, H]
    expected = (y * topk_weights.unsqueeze(-1)).sum(dim=1)  # [T, H]

    plans = three_plans(2, num_experts)
    assert len({tuple(p.physical_to_logical.shape) for p in plans}) == 3  # really different layouts
    outputs = []
    for plan in plans:
        rows, counts, handle = dispatch(x, topk_ids, plan, layer)
        outputs.append(unpermute(scale_by_logical(rows, counts, plan, layer), handle, topk_weights))
    for out in outputs:  # bit for bit the same whatever the placement, and the placement-free sum
        assert torch.equal(out, outputs[0])
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)


def test_dispatch_with_expert_ffn_matches_reference():
    """The expert groups' computation: every slot holds its logical expert's weights."""
    num_tokens, hidden, inter, top_k, num_experts, layer = 29, 16, 24, 2, 8, 0
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    topk_weights = torch.rand(num_tokens, top_k, generator=gen)
    topk_ids = random_topk(num_tokens, top_k, num_experts, seed=6)
    expected = fused_moe_reference(x, topk_weights, topk_ids, w13, w2)
    for plan in three_plans(1, num_experts):
        rows, counts, handle = dispatch(x, topk_ids, plan, layer)
        slot_expert = plan.physical_to_logical[layer].flatten().clamp(min=0)  # [G*S]; empty slots get no rows
        out_rows = expert_ffn(rows, counts.flatten().tolist(), w13[slot_expert], w2[slot_expert])
        out = unpermute(out_rows, handle, topk_weights)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), f"max diff {(out - expected).abs().max():.3g}"


# --- the wire: one message per group, counts then rows ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("plan_index", range(3))
def test_pack_then_unpack_gives_each_group_its_counts_and_rows(plan_index, dtype):
    num_tokens, hidden, top_k, num_experts = 37, 8, 2, 12
    plan = three_plans(2, num_experts)[plan_index]
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(0)).to(dtype)
    topk_ids = random_topk(num_tokens, top_k, num_experts, seed=1)
    slots = plan.slots_per_group
    for layer in range(plan.num_layers):
        rows, counts, _ = dispatch(x, topk_ids, plan, layer)
        handle = sort_pairs(route(topk_ids, plan, layer), plan.num_groups * slots)
        messages = list(pack(x, handle, counts))
        assert len(messages) == plan.num_groups
        inbox = torch.full((message_bytes(slots, max_rows_per_group(num_tokens, top_k, slots), hidden, dtype),),
                           255, dtype=torch.uint8)  # a receive buffer with stale bytes past the message
        row = 0
        for group, message in enumerate(messages):
            n = int(counts[group].sum())
            assert message.dtype == torch.uint8 and message.numel() == message_bytes(slots, n, hidden, dtype)
            inbox[:message.numel()] = message
            got_counts, got_rows = unpack(inbox, slots, hidden, dtype)
            assert torch.equal(got_counts, counts[group])
            assert torch.equal(got_rows, rows[row:row + n])  # bit for bit, in the order dispatch sorts them
            row += n


def test_no_group_gets_more_rows_than_its_receive_buffer_holds():
    num_experts, num_groups, slots, top_k, num_tokens = 12, 3, 5, 4, 50
    for seed in range(20):
        plan = random_plan(1, num_experts, num_groups, slots, seed)
        handle = sort_pairs(route(random_topk(num_tokens, top_k, num_experts, seed), plan, 0), num_groups * slots)
        assert handle.counts.view(num_groups, slots).sum(1).max() <= max_rows_per_group(num_tokens, top_k, slots)
    # The bound is tight: every token routed to experts 0 and 1, both in group 0.
    plan = PlacementPlan.default(1, 8, 2)  # group 0 holds experts 0-3
    handle = sort_pairs(route(torch.tensor([[0, 1]] * num_tokens), plan, 0), 8)
    assert int(handle.counts.view(2, 4)[0].sum()) == max_rows_per_group(num_tokens, 2, 4) == 2 * num_tokens
