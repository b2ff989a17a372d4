"""ExpertGroup without Ray: it loads exactly its own slots, and adopts a re-formed pool's plan only
when that plan keeps (or empties) every slot it holds."""

import pytest
import torch

from moeray.actors.dispatch import message_bytes
from moeray.actors.expert_group import ExpertGroup
from moeray.actors.placement import PlacementPlan


def test_a_group_loads_its_slots_and_adopts_only_plans_that_keep_them(make_checkpoint):
    path = make_checkpoint("mixtral_swa")  # 2 MoE layers, 6 experts
    plan = PlacementPlan.default(2, 6, 2, redundant_slots=1)  # group 1: [3, 4, 5, 0]
    seen = []
    group = ExpertGroup(path, 1, plan, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (8, 8)  # 4 slots x 2 layers
    wider = torch.cat([plan.physical_to_logical, torch.tensor([[[0, 1, 2, -1]]] * 2)], dim=1)  # a third group
    wider[:, 1, 3] = -1  # group 1's replica of 0 is dropped: allowed
    group.adopt(PlacementPlan(wider, 6, version=1), 1)
    assert group.plan.version == 1 and group.group == 1
    renumbered = PlacementPlan(wider[:, 1:], 6, version=2)  # group 0 removed: group 1 becomes 0
    group.adopt(renumbered, 0)
    assert group.group == 0
    other = renumbered.physical_to_logical.clone()
    other[:, 0, 3] = 1  # an empty slot that would need weights loaded
    with pytest.raises(ValueError, match="gives group 0 other experts than this group holds"):
        group.adopt(PlacementPlan(other, 6, version=3), 0)


def test_the_receive_buffer_fits_any_step_of_that_many_tokens_and_is_reused(make_checkpoint):
    path = make_checkpoint("mixtral_swa")  # 2 MoE layers, 6 experts
    plan = PlacementPlan.default(2, 6, 2, redundant_slots=1)
    group = ExpertGroup(path, 0, plan)
    c, slots = group.config, plan.slots_per_group
    big = group.inbox(5)
    assert big.numel() == message_bytes(slots, 5 * min(c.top_k, slots), c.hidden_size, group.dtype)
    assert group.inbox(2) is big  # a smaller step reuses it
    assert group.inbox(6).numel() > big.numel()


@pytest.mark.parametrize("name", ["mixtral_swa", "gpt_oss_swa"])
def test_a_groups_compute_runs_each_slot_with_its_experts_weights(make_checkpoint, name):
    """The rows of slot s go through the expert that slot holds, the model's own weights for it
    (GPT-OSS: and its biases and activation)."""
    from moeray.kernels.moe import expert_ffn
    from moeray.models import load_model
    from moeray.models.model import MoEBlock

    path = make_checkpoint(name)  # 2 or 3 MoE layers, 6 experts
    blocks = [m for m in load_model(path).modules() if isinstance(m, MoEBlock)]
    plan = PlacementPlan.default(len(blocks), 6, 2, redundant_slots=1)  # group 1: [3, 4, 5, 0]
    group = ExpertGroup(path, 1, plan)
    assert group.w13[0].device.type == "cpu"
    counts = [3, 0, 2, 4]  # rows per slot, sorted by slot
    rows = torch.randn(sum(counts), group.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer, block in enumerate(blocks):
        experts = plan.physical_to_logical[layer, 1].tolist()
        local = block.experts
        biases = local.biases[experts] if local.biases is not None else None
        expected = expert_ffn(rows, counts, local.w13.data[experts], local.w2.data[experts], biases, local.activation)
        assert torch.equal(group.compute(layer, rows, counts), expected)
