"""Baseline for `bench/placement.py`: recompute the placement from scratch every round, as
DeepSeek's EPLB does (its global policy), written from the published algorithm:

1. replicate: every logical expert starts with one copy; while slots remain, the expert with the
   highest load per copy gets one more (all G*S slots end up used);
2. pack: copies sorted by load per copy, heaviest first, each goes to the least-loaded group that
   still has a free slot (balanced packing). Nothing stops two copies of one expert from landing in
   the same group; the bench counts those co-located copies.

Because of co-location its output is not always a valid `PlacementPlan`, so this module works on
raw `p2l [L, G, S]` arrays and measures them with the same formula (`imbalance`).

"Experts moved" is counted generously for the baseline: slot order inside a group is free, and its
packs are relabelled onto groups to overlap the previous placement as much as possible (Hungarian
matching per layer, `scipy.optimize.linear_sum_assignment`, greedy if scipy is absent) before
counting a load for every (group, expert) copy that the group did not hold.
"""

import numpy as np

try:
    from scipy.optimize import linear_sum_assignment
except ImportError:  # the bench still runs, with a greedy matching
    linear_sum_assignment = None


def replicate(load: np.ndarray, num_slots: int) -> np.ndarray:
    """load [L, E] -> replicas [L, E] copies per expert (>= 1, summing to num_slots per layer)."""
    num_layers, num_experts = load.shape
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    replicas = np.ones((num_layers, num_experts), dtype=np.int64)
    rows = np.arange(num_layers)
    for _ in range(num_slots - num_experts):
        hottest = np.argmax(load / replicas, axis=-1)  # [L] highest load per copy (first on ties)
        replicas[rows, hottest] += 1
    return replicas


def pack(load: np.ndarray, replicas: np.ndarray, num_groups: int, slots_per_group: int) -> np.ndarray:
    """load [L, E], replicas [L, E] -> p2l [L, G, S]: greedy balanced packing, heaviest copy first."""
    num_layers, num_experts = load.shape
    experts = np.stack([np.repeat(np.arange(num_experts), row) for row in replicas])  # [L, P] copy -> expert
    rows = np.arange(num_layers)[:, None]
    weight = (load / replicas)[rows, experts]  # [L, P] load per copy
    order = np.argsort(-weight, axis=-1, kind="stable")  # [L, P]
    group_load = np.zeros((num_layers, num_groups))
    filled = np.zeros((num_layers, num_groups), dtype=np.int64)
    p2l = np.full((num_layers, num_groups, slots_per_group), -1, dtype=np.int64)
    layers = np.arange(num_layers)
    for k in range(experts.shape[1]):
        copy = order[:, k]  # [L]
        room = np.where(filled < slots_per_group, group_load, np.inf)
        group = np.argmin(room, axis=-1)  # [L] least-loaded group with a free slot
        p2l[layers, group, filled[layers, group]] = experts[layers, copy]
        group_load[layers, group] += weight[layers, copy]
        filled[layers, group] += 1
    return p2l


def rebalance(load: np.ndarray, num_groups: int, slots_per_group: int) -> np.ndarray:
    """load [L, E] -> p2l [L, G, S], from scratch (the previous placement is ignored)."""
    return pack(load, replicate(load, num_groups * slots_per_group), num_groups, slots_per_group)


def align(new: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """new, previous [L, G, S] -> new with its groups relabelled to keep as many copies in place
    as possible (the same balance; fewer loads)."""
    out = np.empty_like(new)
    for layer in range(new.shape[0]):
        overlap = _overlap(new[layer], previous[layer])  # [G new, G old]
        if linear_sum_assignment is not None:
            rows, cols = linear_sum_assignment(overlap, maximize=True)
        else:
            rows, cols = _greedy_match(overlap)
        out[layer, cols] = new[layer, rows]
    return out


def loads_between(previous: np.ndarray, new: np.ndarray) -> int:
    """previous, new [L, G, S] -> (layer, group, expert) copies that new has and previous lacks."""
    count = 0
    for layer in range(new.shape[0]):
        for group in range(new.shape[1]):
            had = set(previous[layer, group].tolist())
            count += len({e for e in new[layer, group].tolist() if e >= 0} - had)
    return count


def colocated(p2l: np.ndarray) -> int:
    """p2l [L, G, S] -> copies that share a group with another copy of the same expert."""
    count = 0
    for row in p2l.reshape(-1, p2l.shape[-1]):
        ids = row[row >= 0]
        count += len(ids) - len(np.unique(ids))
    return count


def imbalance(p2l: np.ndarray, load: np.ndarray) -> np.ndarray:
    """p2l [L, G, S], load [L, E] -> [L] max / mean group load; every copy of expert e carries
    load[e] / copies(e), co-located copies included (the formula of `PlacementPlan.imbalance`)."""
    num_layers, num_experts = load.shape
    ids = p2l.reshape(num_layers, -1)  # [L, G*S]
    copies = np.stack([np.bincount(row[row >= 0], minlength=num_experts) for row in ids])  # [L, E]
    share = load / np.maximum(copies, 1)
    per_slot = np.where(p2l >= 0, np.take_along_axis(share, p2l.clip(min=0).reshape(num_layers, -1), 1)
                        .reshape(p2l.shape), 0.0)
    group_load = per_slot.sum(-1)  # [L, G]
    mean = group_load.mean(-1)
    return np.where(mean > 0, group_load.max(-1) / np.maximum(mean, 1e-12), 1.0)


def _overlap(new: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """new, previous [G, S] -> [G, G]: experts group i of new shares with group j of previous."""
    num_experts = max(new.max(), previous.max()) + 1
    has_new = np.zeros((new.shape[0], num_experts), dtype=np.int64)
    has_old = np.zeros((previous.shape[0], num_experts), dtype=np.int64)
    for has, p2l in ((has_new, new), (has_old, previous)):
        groups, slots = np.nonzero(p2l >= 0)
        has[groups, p2l[groups, slots]] = 1
    return has_new @ has_old.T


def _greedy_match(overlap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest overlaps first, each row and column used once."""
    num = overlap.shape[0]
    rows, cols, used_r, used_c = [], [], set(), set()
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        r, c = divmod(int(flat), num)
        if r not in used_r and c not in used_c:
            rows.append(r), cols.append(c), used_r.add(r), used_c.add(c)
    order = np.argsort(rows)
    return np.asarray(rows)[order], np.asarray(cols)[order]
