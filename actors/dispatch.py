"""Dispatch math (pure): which physical replica serves each (token, logical expert) pair, and the
bytes each expert group is sent.

A step's routed pairs `topk_ids [T, K]` become physical ids `p = g * S + s` (group g, slot s).
The pairs of an expert with r replicas are dealt out round-robin in pair order (the j-th pair
of expert e goes to replica j % r), so a replicated expert's tokens are split evenly and the
choice depends only on the step's routing, never on timing. Sorting by physical id then gives
each group one contiguous run of rows, itself sorted by slot: `kernels.moe.permute` does that
sort when keyed by physical id, and `kernels.moe.unpermute` combines the results in top-k order,
so outputs do not depend on the placement.

Example: E=4, replica_count=[2, 1, 2, 1], logical_to_physical=[[0, 5], [1, -1], [2, 3], [4, -1]]
    topk_ids = [[0, 2], [0, 1], [2, 0]]   -> physical = [[0, 2], [5, 1], [3, 0]]

On the wire (`pack` / `unpack`) group g's message is its per-slot counts, then its rows:
    [S] int64 counts | [n_g, H] rows sorted by slot          (n_g = counts.sum())
so one message per group and layer carries both, and no separate counts round is needed. The
group receives it into a buffer of `message_bytes(S, max_rows_per_group(T, K, S), H, dtype)`:
a token's K experts are distinct and a group holds at most one replica of each, so no group
gets more than T * min(K, S) rows.
"""

from typing import Callable, Iterator

import torch
from torch import Tensor

from moeray.actors.placement import PlacementPlan
from moeray.kernels.moe import PermuteHandle, permute

COUNT_BYTES = 8  # one int64 per slot at the head of a message


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


def route(topk_ids: Tensor, plan: PlacementPlan, moe_layer: int) -> Tensor:
    """topk_ids [T, K] logical -> physical ids [T, K] under `plan`."""
    if plan.logical_to_physical.shape[2] == 1:  # no replicas anywhere: one gather
        return plan.logical_to_physical[moe_layer, :, 0][topk_ids]
    return assign_replicas(topk_ids, plan.replica_count[moe_layer], plan.logical_to_physical[moe_layer])


def dispatch(x: Tensor, topk_ids: Tensor, plan: PlacementPlan, moe_layer: int) -> tuple[Tensor, Tensor, PermuteHandle]:
    """x [T, H], topk_ids [T, K] -> (rows [T*K, H] sorted by (group, slot), counts [G, S], handle)."""
    rows, handle = permute(x, route(topk_ids, plan, moe_layer), plan.num_groups * plan.slots_per_group)
    return rows, handle.counts.view(plan.num_groups, plan.slots_per_group), handle


def max_rows_per_group(num_tokens: int, top_k: int, slots: int) -> int:
    """The most rows a group can get from a step of `num_tokens` tokens (see the module docstring)."""
    return num_tokens * min(top_k, slots)


def head_bytes(slots: int) -> int:
    """The counts at the head of a message."""
    return slots * COUNT_BYTES


def message_bytes(slots: int, num_rows: int, hidden: int, dtype: torch.dtype) -> int:
    """Size of a group's message: [S] int64 counts + [num_rows, H] rows."""
    return head_bytes(slots) + num_rows * hidden * dtype.itemsize


def pack(x: Tensor, handle: PermuteHandle, counts: Tensor,
         alloc: Callable[[int, int], Tensor] | None = None) -> Iterator[Tensor]:
    """x [T, H], handle of `sort_pairs` (physical ids), counts [G, S] -> yields group g's message for g = 0, 1, ...:
    uint8 [message_bytes], its counts then x's rows of its pairs sorted by slot, gathered from x
    straight into the message (no intermediate copy) when asked for, so the caller can send one
    group's message while the next is gathered. `alloc(group, nbytes)` gives the message's memory
    (default: a new tensor)."""
    slots, hidden = counts.shape[1], x.shape[1]
    tokens = handle.tokens  # [T*K] token of each sorted pair
    row, head = 0, head_bytes(slots)
    for group, (group_counts, n) in enumerate(zip(counts, counts.sum(1).tolist())):
        nbytes = message_bytes(slots, n, hidden, x.dtype)
        message = alloc(group, nbytes) if alloc else torch.empty(nbytes, dtype=torch.uint8, device=x.device)
        message[:head].view(torch.long).copy_(group_counts)
        torch.index_select(x, 0, tokens[row:row + n], out=message[head:].view(x.dtype).view(n, hidden))
        row += n
        yield message


def unpack(message: Tensor, slots: int, hidden: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A group's received buffer (uint8, possibly longer than the message) -> (counts [S], rows [n, H]),
    both views into it."""
    head = head_bytes(slots)
    counts = message[:head].view(torch.long)  # [S]
    n = int(counts.sum())
    return counts, message[head:message_bytes(slots, n, hidden, dtype)].view(dtype).view(n, hidden)
