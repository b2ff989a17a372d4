"""Reshaping a plan when the pool of expert groups changes: grow, drain, remove_group, lose_group.

Why not just call the planner on the new pool? The planner balances a pool of fixed size under a
per-round budget. A change of pool size has rules of its own, and they are what lets serving go
on through it:

    scale-out   grow(plan, n)          [L, G, S] -> [L, G+n, S]   the new groups are ranks G..G+n-1
                Serving groups keep every expert they hold or give it up (a move empties the old
                slot: free); they never load one. Only the new groups stage weights, before they
                serve, so serving sees nothing but the step boundary that activates the plan.
    scale-in    drain(plan, g)         [L, G, S] -> [L, G, S]     group g holds nothing
                Experts whose only copy is in g get a copy elsewhere first (staged in the background
                like any migration, while g still serves them); activate; then
                remove_group(plan, g)  [L, G, S] -> [L, G-1, S]   at the re-formation that releases g.
    failure     lose_group(plan, g)    [L, G, S] -> [L, G-1, S]   at once: g's slots cannot be read
                Experts with a copy elsewhere are served from it; those whose only copy was in g are
                reloaded from the checkpoint into free or surplus slots of the survivors, and the
                (layer, expert) pairs returned as `lost` cannot be served until those loads land.

Renumbering: a group's index is its rank in the expert world. Removing group g shifts groups
g+1..G-1 down by one (g+1 becomes g, ...), and the data plane re-forms the world with the survivors
in that order; group indices in moves returned by lose_group are already the new ones. Policy pins
name groups by index, so they shift too.

Where a sole copy goes (drain, lose_group): heaviest expert first, each into the free slot, or the
slot of a *surplus* copy (its expert keeps another copy, and the slot is not pinned), that leaves
the layer's busiest group lowest, then the destination group lowest, then an empty slot before a
surplus copy. Every such placement uses up one free-or-surplus slot, so it fails only when a layer
has more sole copies than free and surplus slots, and then PlanError says how many are missing.
A layer that saw no tokens is planned as if every expert were equally hot, so a new group still
gets its share of experts and sole copies still spread out.

Worked example, E=4, one layer, load [6, 2, 2, 2] (each copy carries its expert's load / copies):
    plan [[0, 1, -1], [2, 3, 0]]                                  group loads [3+2, 2+2+3] = [5, 7]
    grown = grow(plan, 1)      -> [[0, 1, -1], [2, 3, 0], [0, 2, 3]]        group loads [4, 4, 4]
        three "replicate" loads, all into the new group 2; groups 0 and 1 load nothing
    drained = drain(grown, 0)  -> [[-1, -1, -1], [1, 3, 0], [0, 2, 3]]      group loads [0, 6, 6]
        expert 0 keeps its copies in groups 1 and 2: dropped, free; expert 1's only copy moves over
        group 1's surplus copy of expert 2: Move(0, 1, 0, old_expert=2, new_expert=1, kind="move")
    remove_group(drained, 0)   -> [[1, 3, 0], [0, 2, 3]]                    old groups 1, 2 are now 0, 1
    lose_group(grown, 0)       -> the same plan in one go, moves [Move(0, 0, 0, 2, 1, "reload")]
        (survivors' numbering), lost [(0, 1)]: layer 0 waits for expert 1's reload from the checkpoint
    drain(plan, 1)             -> PlanError: experts 2 and 3 need 2 slots, group 0 has 1 free slot and
        no surplus copy ("drain group 1: 1 slot(s) missing: layer 0 needs 1 more ...")
"""

from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from moeray.actors.placement import PlacementPlan, PlanError
from moeray.autoscaler import planner
from moeray.autoscaler.planner import Move, PlanLimits, Topology


def grow(plan: PlacementPlan, new_groups: int, load: Tensor, limits: PlanLimits,
         topology: Topology) -> tuple[PlacementPlan, list[Move]]:
    """plan [L, G, S], load [L, E] tokens per logical expert, topology [G + new_groups] nodes (the new
    groups' too) -> (plan [L, G + new_groups, S] with version + 1, moves).

    The planner runs on the widened plan with the serving groups closed (they may only give copies
    up) and a budget of every new slot, so balance, anti-affinity, max_replicas_per_expert, pins and
    frozen layers work as in a rebalance; every move with new_expert >= 0 is a load on a new group.
    The planner stops once a layer reaches limits.target_imbalance: slots it did not need stay empty
    (pass target_imbalance=1.0 to balance as far as moves help)."""
    if type(new_groups) is not int or new_groups < 1:
        raise PlanError(f"new_groups must be a positive int, got {new_groups!r}")
    num_layers, num_groups, slots = plan.physical_to_logical.shape
    _check_topology(topology, num_groups + new_groups, f"the grown pool (G={num_groups} + {new_groups})")
    load_np = _load(load, plan)
    empty = torch.full((num_layers, new_groups, slots), -1, dtype=torch.long)
    wider = PlacementPlan(torch.cat([plan.physical_to_logical, empty], 1), plan.num_experts, plan.version)
    grow_limits = replace(limits, max_moves=num_layers * new_groups * slots, max_bytes=None,
                          closed_groups=limits.closed_groups | frozenset(range(num_groups)))
    new, moves = planner.plan(torch.from_numpy(load_np), wider, topology, grow_limits)
    return new.with_version(plan.version + 1), moves


def drain(plan: PlacementPlan, group: int, load: Tensor, limits: PlanLimits,
          topology: Topology) -> tuple[PlacementPlan, list[Move]]:
    """plan [L, G, S], load [L, E], topology [G] -> (plan [L, G, S] with version + 1 in which `group`
    holds nothing, moves).

    A copy in `group` whose expert has another copy is dropped ("drop", free); a sole copy moves to a
    free or surplus slot of another group (two "move"s: one empties `group`'s slot, one loads the
    destination). Not capped by limits.max_moves: the group must be empty before it can go,
    so the caller stages these loads over as many rounds as it likes before activating. Of the limits
    only `pinned` matters (a pinned copy is never overwritten; pins in `group` itself cannot hold);
    topology is checked for shape only (a sole copy shares a node with no other copy)."""
    _check_group(plan, group)
    _check_topology(topology, plan.num_groups, "the plan")
    p2l = plan.physical_to_logical.numpy()  # [L, G, S]
    new, placed, orphans = _rehome_all(p2l, group, _load(load, plan), _pins(limits, p2l), f"drain group {group}")
    moves = [Move(layer, group, slot, int(expert), -1, "move" if int(expert) in orphans[layer] else "drop")
             for layer in range(p2l.shape[0]) for slot, expert in enumerate(p2l[layer, group]) if expert >= 0]
    moves += [Move(layer, g, s, old, expert, "move") for layer, g, s, old, expert in placed]
    moves.sort(key=lambda m: (m.layer, m.group, m.slot))
    return PlacementPlan(torch.from_numpy(new), plan.num_experts, plan.version + 1), moves


def remove_group(plan: PlacementPlan, group: int) -> PlacementPlan:
    """plan [L, G, S] in which `group` holds nothing (see drain) -> plan [L, G-1, S] with version + 1:
    groups after `group` shift down by one (module docstring: renumbering)."""
    _check_group(plan, group)
    held = (plan.physical_to_logical[:, group] >= 0).nonzero().tolist()
    if held:
        layer, slot = held[0]
        raise PlanError(f"group {group} still holds expert {int(plan.physical_to_logical[layer, group, slot])} "
                        f"(layer {layer} slot {slot}; {len(held)} slot(s) in all): drain it before removing it")
    keep = [g for g in range(plan.num_groups) if g != group]
    return PlacementPlan(plan.physical_to_logical[:, keep].contiguous(), plan.num_experts, plan.version + 1)


def lose_group(plan: PlacementPlan, group: int, load: Tensor, limits: PlanLimits,
               topology: Topology) -> tuple[PlacementPlan, list[Move], list[tuple[int, int]]]:
    """plan [L, G, S] that was active when `group` died, load [L, E], topology [G]
    -> (plan [L, G-1, S] with version + 1, moves, lost).

    moves: one "reload" per sole copy the group held, into a survivor's free or surplus slot, with
    the survivors' new indices; the weights come from the checkpoint. lost: every (layer, expert)
    whose only copy was in `group`, sorted: those layers cannot be served until the reloads land.
    PlanError when the survivors have no room: the caller restarts a group instead."""
    _check_group(plan, group)
    _check_topology(topology, plan.num_groups, "the plan")
    if plan.num_groups == 1:
        raise PlanError(f"group {group} was the only expert group: no survivor can serve its experts; restart it")
    p2l = plan.physical_to_logical.numpy()  # [L, G, S]
    new, placed, orphans = _rehome_all(p2l, group, _load(load, plan), _pins(limits, p2l),
                                       f"lost group {group}", hint="; restart a group instead")
    keep = [g for g in range(plan.num_groups) if g != group]
    moves = [Move(layer, g - (g > group), s, old, expert, "reload") for layer, g, s, old, expert in placed]
    moves.sort(key=lambda m: (m.layer, m.group, m.slot))
    lost = sorted((layer, expert) for layer, experts in enumerate(orphans) for expert in experts)
    survivors = torch.from_numpy(np.ascontiguousarray(new[:, keep]))  # PlacementPlan views it flat
    return PlacementPlan(survivors, plan.num_experts, plan.version + 1), moves, lost


def drain_candidate(plan: PlacementPlan, load: Tensor) -> int:
    """plan [L, G, S], load [L, E] -> the group a scale-in should drain: the one holding the fewest sole
    copies (each is a load the drain needs), then the least load, then the highest index (removing the
    last group renumbers no one)."""
    p2l = plan.physical_to_logical  # [L, G, S]
    sole = plan.replica_count.gather(1, p2l.clamp(min=0).flatten(1)).view_as(p2l) == 1  # [L, G, S]
    sole_per_group = (sole & (p2l >= 0)).sum((0, 2))  # [G]
    load_per_group = plan.group_load(torch.from_numpy(_load(load, plan))).sum(0)  # [G]
    return min(range(plan.num_groups), key=lambda g: (int(sole_per_group[g]), float(load_per_group[g]), -g))


# --- sole copies into free or surplus slots ----------------------------------------------------------


def _rehome_all(p2l: np.ndarray, gone: int, load: np.ndarray, pinned: np.ndarray, what: str, hint: str = ""):
    """p2l [L, G, S], load [L, E], pinned [L, G, S] -> (new p2l [L, G, S] with row `gone` all -1,
    placed [(layer, group, slot, old expert, expert)], orphans [L] lists of sole-copy experts).
    PlanError naming every short layer if some layer has no room."""
    short = {layer: need for layer in range(p2l.shape[0])
             if (need := _shortage(p2l[layer], gone, pinned[layer], load.shape[1])) > 0}
    if short:
        per_layer = ", ".join(f"layer {layer} needs {need} more" for layer, need in short.items())
        raise PlanError(f"{what}: {sum(short.values())} slot(s) missing: {per_layer} (experts whose only copy is "
                        f"in group {gone}, beyond the free and surplus slots of the other groups){hint}")
    new, placed, orphans = p2l.copy(), [], []
    for layer in range(p2l.shape[0]):
        layer_placed, layer_orphans = _rehome(new[layer], gone, load[layer], pinned[layer])
        placed += [(layer, *p) for p in layer_placed]
        orphans.append(layer_orphans)
    return new, placed, orphans


def _shortage(p2l: np.ndarray, gone: int, pinned: np.ndarray, num_experts: int) -> int:
    """p2l [G, S], pinned [G, S] -> how many sole copies of `gone` find no free or surplus slot.
    An expert with r copies outside `gone`, u of them unpinned, can give up min(r - 1, u) of them."""
    rest = p2l.copy()
    rest[gone] = -1
    held = rest >= 0
    replicas = np.bincount(rest[held], minlength=num_experts)  # [E]
    unpinned = np.bincount(rest[held & ~pinned], minlength=num_experts)  # [E]
    orphans = np.setdiff1d(p2l[gone][p2l[gone] >= 0], rest[held])
    free = int((~held).sum()) - p2l.shape[1]  # the gone row is not free
    surplus = int(np.minimum(replicas - 1, unpinned).clip(min=0).sum())
    return max(0, len(orphans) - free - surplus)


def _rehome(p2l: np.ndarray, gone: int, load: np.ndarray, pinned: np.ndarray):
    """In place: p2l [G, S] loses row `gone`; each sole copy it held, heaviest first, takes the free or
    surplus slot that leaves the busiest group, then the destination, lowest (load [E], pinned [G, S]).
    -> ([(group, slot, old expert, expert)], sole-copy experts). Assumes _shortage said there is room."""
    num_groups = p2l.shape[0]
    orphans = [int(e) for e in p2l[gone] if e >= 0 and (p2l == e).sum() == 1]
    p2l[gone] = -1
    placed = []
    for expert in sorted(orphans, key=lambda e: (-load[e], e)):
        held = p2l >= 0
        g_idx, s_idx = np.nonzero(held)
        present = np.zeros((len(load), num_groups), dtype=bool)  # [E, G]
        present[p2l[g_idx, s_idx], g_idx] = True
        replicas = present.sum(1)  # [E]
        share = load / np.maximum(replicas, 1)  # [E] what each copy carries
        after_drop = load / np.maximum(replicas - 1, 1)  # [E] ... once one copy is overwritten
        group_load = np.bincount(g_idx, weights=share[p2l[g_idx, s_idx]], minlength=num_groups)  # [G]
        usable = ~held | (held & (replicas[p2l.clip(min=0)] > 1) & ~pinned)
        usable[gone] = False
        groups, slots = np.nonzero(usable)  # [D]
        olds = p2l[groups, slots]
        has, safe = olds >= 0, olds.clip(min=0)
        others = present[safe] & (np.arange(num_groups) != groups[:, None])  # [D, G] the donor's other copies
        changed = group_load + np.where(has[:, None], others * (after_drop - share)[safe, None], 0.0)  # [D, G]
        rows = np.arange(len(groups))
        changed[rows, groups] += load[expert] - np.where(has, share[safe], 0.0)
        pick = np.lexsort((slots, groups, has, changed[rows, groups], changed.max(1)))[0]
        group, slot = int(groups[pick]), int(slots[pick])
        placed.append((group, slot, int(olds[pick]), expert))
        p2l[group, slot] = expert
    return placed, orphans


# --- inputs ------------------------------------------------------------------------------------------


def _load(load: Tensor, plan: PlacementPlan) -> np.ndarray:
    """load [L, E] -> float64 [L, E], a layer with no tokens replaced by all ones (every expert alike)."""
    load_np = torch.as_tensor(load, dtype=torch.float64).cpu().numpy().copy()
    if load_np.shape != (plan.num_layers, plan.num_experts):
        raise PlanError(f"load has shape {load_np.shape}, expected [layers={plan.num_layers}, "
                        f"experts={plan.num_experts}]")
    if not np.isfinite(load_np).all() or (load_np < 0).any():
        raise PlanError("load must be finite and >= 0 tokens per expert")
    load_np[load_np.sum(1) == 0] = 1.0
    return load_np


def _pins(limits: PlanLimits, p2l: np.ndarray) -> np.ndarray:
    """limits.pinned (layer, group, expert) -> [L, G, S] bool: the slots holding a pinned copy."""
    pinned = np.zeros(p2l.shape, dtype=bool)
    for layer, group, expert in limits.pinned:
        if 0 <= layer < p2l.shape[0] and 0 <= group < p2l.shape[1] and expert >= 0:
            pinned[layer, group] |= p2l[layer, group] == expert
    return pinned


def _check_group(plan: PlacementPlan, group: int) -> None:
    if type(group) is not int or not 0 <= group < plan.num_groups:
        raise PlanError(f"group {group!r} does not exist (the plan has {plan.num_groups} groups)")


def _check_topology(topology: Topology, num_groups: int, what: str) -> None:
    if len(topology.group_nodes) != num_groups:
        raise PlanError(f"topology names {len(topology.group_nodes)} groups, {what} has {num_groups}")
