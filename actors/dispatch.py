"""Dispatch math (pure): which physical replica serves each (token, logical expert) pair.

A step's routed pairs `topk_ids [T, K]` become physical ids `p = g * S + s` (group g, slot s).
The pairs of an expert with r replicas are dealt out round-robin in pair order (the j-th pair
of expert e goes to replica j % r), so a replicated expert's tokens are split evenly and the
choice depends only on the step's routing, never on timing. Sorting by physical id then gives
each group one contiguous run of rows, itself sorted by slot: `kernels.moe.permute` does that
sort when keyed by physical id, and `kernels.moe.unpermute` combines the results in top-k order,
so outputs do not depend on the placement.

Example: E=4, replica_count=[2, 1, 2, 1], logical_to_physical=[[0, 5], [1, -1], [2, 3], [4, -1]]
    topk_ids = [[0, 2], [0, 1], [2, 0]]   -> physical = [[0, 2], [5, 1], [3, 0]]
"""

import torch
from torch import Tensor

from moeray.actors.placement import PlacementPlan
from moeray.kernels.moe import PermuteHandle, permute


def assign_replicas(topk_ids: Tensor, replica_count: Tensor, logical_to_physical: Tensor) -> Tensor:
    """topk_ids [T, K]; replica_count [E]; logical_to_physical [E, Rmax] -> physical ids [T, K]."""
    flat = topk_ids.reshape(-1)  # [T*K]
    num_experts = replica_count.shape[0]
    order = torch.argsort(flat, stable=True)  # [T*K]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    starts = torch.cumsum(counts, 0) - counts  # [E]
    ranks = torch.arange(flat.numel(), device=flat.device)  # [T*K] int64, whatever topk_ids' dtype
    occurrence = torch.empty_like(ranks)
    occurrence[order] = ranks - starts[flat[order]]  # j: pair's rank within its expert
    replica = occurrence % replica_count[flat]  # [T*K]
    return logical_to_physical[flat, replica].view_as(topk_ids)


def dispatch(x: Tensor, topk_ids: Tensor, plan: PlacementPlan, moe_layer: int) -> tuple[Tensor, Tensor, PermuteHandle]:
    """x [T, H], topk_ids [T, K] -> (rows [T*K, H] sorted by (group, slot), counts [G, S], handle)."""
    if plan.logical_to_physical.shape[2] == 1:  # no replicas anywhere: one gather
        physical = plan.logical_to_physical[moe_layer, :, 0][topk_ids]  # [T, K]
    else:
        physical = assign_replicas(topk_ids, plan.replica_count[moe_layer], plan.logical_to_physical[moe_layer])
    rows, handle = permute(x, physical, plan.num_groups * plan.slots_per_group)
    return rows, handle.counts.view(plan.num_groups, plan.slots_per_group), handle
