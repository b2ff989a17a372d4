"""Migration-aware placement planner: (load [L, E], current plan, topology, limits) -> (new plan, moves).

Why not recompute the placement from scratch, as DeepSeek's EPLB does? Because every slot that
gets an expert it did not hold costs a weight transfer (tens of MB per expert at DeepSeek-V3
size), and a from-scratch packing reshuffles most slots on every rebalance even when a handful
of moves would balance as well. This planner starts from the current plan and spends a per-round
budget of *loads* (one load = one slot holding, at the end of the round, a logical expert it did
not hold at the start; emptying a slot is free) on the moves with the best balance gain per load.

Load model (the one `PlacementPlan.group_load` uses): an expert's tokens are split evenly over its
copies, so each copy of expert e carries `share[e] = load[e] / replicas[e]`; a group's load is the
sum over its slots; a layer's imbalance is max group load / mean group load. The mean is fixed by
the load alone, so lowering the busiest group is the only way to lower imbalance.

Each layer, while its imbalance is above target, takes one of two kinds of step:

1. split (kind "replicate"): while some expert's copies each carry more than SPLIT_LEVEL of a
   mean group, one such expert gets one more copy, in an empty slot or over a spare copy of a
   colder expert (a *donor*, whose copies would still carry less than (1 - SPLIT_MARGIN) of the
   split one's: the margin keeps noise from passing a copy back and forth). Of all such (expert,
   slot) pairs it takes the one on a node without a copy of the expert, then the one whose layer
   ends with the lowest busiest group. This is EPLB's water-filling done one copy at a time and
   only for heavy copies. Heavy copies make packing coarse and leave no slack when an expert heats
   up further; and they must be split first, because once the groups are packed around a heavy
   copy, no single step can make room for another one (every group is already full).
2. rebalance, out of the layer's busiest group b (one slot of b holds expert e):
       drop       e has a spare copy: empty b's slot (free; e's other copies take its share)
       replicate  add a copy of e in a group h that lacks it, in an empty slot or over a spare
                  copy (1 load); every copy of e, b's included, then carries less
       move       put e into such a slot of h, empty b's slot (1 load)
       swap       exchange e with an expert f of another group h (2 loads)
   scored by how much it lowers the layer's *overload*
       F = max_g load_g + sum_g max(0, load_g - target)      (target = target_imbalance * mean)
   which counts the busiest group and every group above target, so when two groups tie at the
   top a move that fixes one of them still scores. A rebalance step never raises the busiest
   group and lowers F strictly, so planning ends. A copy is *spare* only if dropping it leaves the
   expert's copies under SPLIT_LEVEL, so rebalancing never undoes a split.

Groups in `limits.closed_groups` never receive a copy, though they may lose one (drop, move), and
while any group is closed a split may not lift the busiest group (the steps that would repair it
could only fill the open groups): `reshape.grow` closes the serving groups so that only the new
groups load weights.

Copies that would share a node with another copy of the same expert (soft anti-affinity) count
NODE_SHARING_DISCOUNT of their gain. A split can lift a group above the layer's starting busiest
load; such a layer is *in debt* and its steps go before every other layer's, and if the budget runs
out while it is in debt it goes back to its last state that was not: balance on the planning
window never gets worse than doing nothing.

Budget is global over layers: a heap holds each layer's best step keyed by gain per load, gains in
imbalance units (a split's gain is how much lower the split expert's copies get), so layers of
different traffic compare fairly; the planner takes the globally best step (layers in debt first),
rescores that layer, and repeats until the budget, the targets, or the gains run out.
Deterministic: ties go to the lower layer, then to the first candidate in (drop, replicate, move,
swap) and slot order.

Worked example, E=4, G=2, S=3, one layer, load = [6, 1, 1, 1] (mean group load 4.5), target 1.0:
    current [[0, 1, 3], [2, 3, -1]]: shares [6, 1, 1, 0.5], group loads [7.5, 1.5], imbalance 1.67
    expert 0's one copy carries 6 > SPLIT_LEVEL * 4.5: split it into group 1's empty slot (1 load)
    new [[0, 1, 3], [2, 3, 0]]: group loads [4.5, 4.5], imbalance 1.0
    moves [Move(layer=0, group=1, slot=2, old_expert=-1, new_expert=0, kind="replicate")]
"""

import heapq
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moeray.actors.placement import PlacementPlan

SPLIT_LEVEL = 0.25  # split experts whose copies carry more than this fraction of a mean group's load
SPLIT_MARGIN = 0.1  # a donor's copies must stay this much lighter than the split expert's (no ping-pong)
NODE_SHARING_DISCOUNT = 0.5  # a copy on a node that already holds one counts this much of its gain
FREE = 1e12  # priority multiplier for steps that cost no load (drops, undoing this round's loads)


@dataclass(frozen=True)
class Topology:
    group_nodes: tuple[int, ...]  # [G] node index of each expert group (soft anti-affinity across nodes)


@dataclass(frozen=True)
class PlanLimits:
    max_moves: int  # loads per round (a slot getting a logical expert it did not hold = 1 load)
    max_bytes: int | None  # bytes loaded per round, None = no cap: bytes_per_expert * loads <= this
    bytes_per_expert: int  # weight bytes of one expert (all experts the same size)
    max_replicas_per_expert: int  # copies of one logical expert in one layer, >= 1
    target_imbalance: float  # stop spending budget on a layer once its imbalance <= this (e.g. 1.05)
    layers: frozenset[int] | None = None  # MoE layers the planner may change (None = all)
    pinned: frozenset[tuple[int, int, int]] = frozenset()  # (layer, group, expert): that copy stays put
    min_gain: float = 0.0  # a rebalance step must lower F by this fraction of the busiest group's load
    closed_groups: frozenset[int] = frozenset()  # groups that may lose copies but never receive one (see reshape.grow)

    @property
    def max_loads(self) -> int:
        """The round's budget in loads: the tighter of max_moves and max_bytes."""
        if self.max_bytes is None or self.bytes_per_expert == 0:
            return self.max_moves
        return min(self.max_moves, self.max_bytes // self.bytes_per_expert)


@dataclass(frozen=True)
class Move:
    """One slot whose expert changes: the round's final diff, one record per changed slot."""
    layer: int
    group: int
    slot: int
    old_expert: int  # -1 = was empty
    new_expert: int  # -1 = emptied
    kind: str  # the step that last changed this slot: "replicate" | "move" | "swap" | "drop" | "reload" (reshape)

    @property
    def is_load(self) -> bool:
        """True when the slot must load weights (emptying a slot costs nothing)."""
        return self.new_expert >= 0


def plan(load: Tensor, current: PlacementPlan, topology: Topology,
         limits: PlanLimits) -> tuple[PlacementPlan, list[Move]]:
    """load [L, E] tokens per logical expert over the window; current plan [L, G, S]
    -> (new plan [L, G, S] with version + 1, moves), or (current, []) when nothing is worth moving."""
    load_np = _check(load, current, topology, limits)
    node_of = np.asarray(topology.group_nodes, dtype=np.int64)
    p2l = current.physical_to_logical.numpy()  # [L, G, S]
    layers = range(current.num_layers) if limits.layers is None else sorted(limits.layers)
    pins = np.zeros(p2l.shape, dtype=bool)  # [L, G, S]
    for layer, group, expert in limits.pinned:
        if 0 <= layer < p2l.shape[0] and 0 <= group < p2l.shape[1] and expert >= 0:
            pins[layer, group] |= p2l[layer, group] == expert  # a pin on an absent copy pins nothing
    states = {layer: _Layer(p2l[layer], load_np[layer], pins[layer], node_of, limits) for layer in layers}
    budget, spent = limits.max_loads, 0
    heap: list = []
    for layer, st in states.items():
        _push(heap, st, layer, _best_step(st, budget))
    while heap:
        *_, layer, step = heapq.heappop(heap)
        st = states[layer]
        if spent + step.cost <= budget:
            st.apply(step)
            spent += step.cost
        _push(heap, st, layer, _best_step(st, budget - spent))  # rescored: changed, or the budget shrank
    for st in states.values():
        st.settle()
    assert sum(st.spent() for st in states.values()) <= budget
    return _result(current, states)


def mean_imbalance(plan_: PlacementPlan, load: Tensor) -> float:
    """Mean over layers of `plan_.imbalance(load)`: the one number the bench and the simulator report."""
    return float(plan_.imbalance(load).mean())


def loads_of(moves: list[Move]) -> int:
    """Slots that must load weights: the unit of the round's migration budget."""
    return sum(move.is_load for move in moves)


@dataclass(frozen=True)
class _Step:
    priority: float  # gain per load in imbalance units, node-sharing discounted; FREE * gain when cost <= 0
    cost: int  # loads this adds to the round (<= 0 when it empties or undoes an earlier load)
    kind: str
    changes: tuple[tuple[int, int, int], ...]  # (group, slot, new expert)


class _Layer:
    """One layer's working state while planning: the only mutable thing here, private to `plan`."""

    def __init__(self, p2l: np.ndarray, load: np.ndarray, pinned: np.ndarray, node_of: np.ndarray,
                 limits: PlanLimits):
        self.p2l = p2l.copy()  # [G, S], -1 = empty
        self.orig = p2l  # [G, S] as the round started: what counts as a load
        self.load = load  # [E]
        self.pinned = pinned  # [G, S] bool
        self.node_of = node_of  # [G]
        self.limits = limits
        self.closed = np.isin(np.arange(p2l.shape[0]), list(limits.closed_groups))  # [G] never receive a copy
        self.mean = load.sum() / p2l.shape[0]  # mean group load, fixed by the load
        self.target_load = limits.target_imbalance * self.mean
        self.split_load = SPLIT_LEVEL * self.mean
        self.kinds: dict[tuple[int, int], str] = {}  # (group, slot) -> the step that last changed it
        self.refresh()
        self.start_top = self.group_load.max()
        self.good = (self.p2l.copy(), {})  # the last state whose busiest group was no higher than at the start

    def refresh(self) -> None:
        num_experts, num_groups = self.load.shape[0], self.p2l.shape[0]
        g_idx, s_idx = np.nonzero(self.p2l >= 0)
        experts = self.p2l[g_idx, s_idx]
        self.present = np.zeros((num_experts, num_groups), dtype=bool)  # [E, G]
        self.present[experts, g_idx] = True
        self.replicas = np.bincount(experts, minlength=num_experts)  # [E]
        self.share = self.load / np.maximum(self.replicas, 1)  # [E] what each copy carries
        self.after_drop = self.load / np.maximum(self.replicas - 1, 1)  # [E] ... with one copy fewer
        self.spare = (self.replicas > 1) & (self.after_drop <= self.split_load)  # [E] droppable when rebalancing
        self.group_load = np.bincount(g_idx, weights=self.share[experts], minlength=num_groups)  # [G]
        self.node_copies = np.zeros((num_experts, self.node_of.max() + 1), dtype=np.int64)  # [E, N]
        np.add.at(self.node_copies, (experts, self.node_of[g_idx]), 1)

    @property
    def in_debt(self) -> bool:
        """A split lifted the busiest group above where it started and no step has repaired it yet."""
        return self.group_load.max() > self.start_top * (1 + 1e-12)

    def apply(self, step: _Step) -> None:
        for group, slot, expert in step.changes:
            self.p2l[group, slot] = expert
            self.kinds[group, slot] = step.kind
        self.refresh()
        if not self.in_debt:
            self.good = (self.p2l.copy(), dict(self.kinds))

    def settle(self) -> None:
        """Back to the last good state if the budget ran out in debt: never worse than doing nothing."""
        if self.in_debt:
            self.p2l, self.kinds = self.good[0].copy(), dict(self.good[1])
            self.refresh()

    def spent(self) -> int:
        return int(((self.p2l != self.orig) & (self.p2l >= 0)).sum())


def _check(load: Tensor, current: PlacementPlan, topology: Topology, limits: PlanLimits) -> np.ndarray:
    load_np = torch.as_tensor(load, dtype=torch.float64).cpu().numpy()
    if load_np.shape != (current.num_layers, current.num_experts):
        raise ValueError(f"load has shape {load_np.shape}, expected [layers={current.num_layers}, "
                         f"experts={current.num_experts}]")
    if not np.isfinite(load_np).all() or (load_np < 0).any():
        raise ValueError("load must be finite and >= 0 tokens per expert")
    if len(topology.group_nodes) != current.num_groups:
        raise ValueError(f"topology names {len(topology.group_nodes)} groups, the plan has {current.num_groups}")
    if any(node < 0 for node in topology.group_nodes):
        raise ValueError(f"node indices must be >= 0, got {topology.group_nodes}")
    if limits.max_moves < 0 or (limits.max_bytes is not None and limits.max_bytes < 0):
        raise ValueError(f"max_moves and max_bytes must be >= 0, got {limits.max_moves}, {limits.max_bytes}")
    if limits.bytes_per_expert < 0:
        raise ValueError(f"bytes_per_expert must be >= 0, got {limits.bytes_per_expert}")
    if limits.max_replicas_per_expert < 1:
        raise ValueError(f"max_replicas_per_expert must be >= 1, got {limits.max_replicas_per_expert}")
    if not limits.target_imbalance >= 1.0:
        raise ValueError(f"target_imbalance must be >= 1.0 (1.0 = perfect), got {limits.target_imbalance}")
    if limits.min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {limits.min_gain}")
    bad = [layer for layer in limits.layers or () if not 0 <= layer < current.num_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside the plan's {current.num_layers} MoE layers")
    bad = sorted(group for group in limits.closed_groups if not 0 <= group < current.num_groups)
    if bad:
        raise ValueError(f"closed_groups {bad} are outside the plan's {current.num_groups} groups")
    return load_np


def _push(heap: list, st: _Layer, layer: int, step: _Step | None) -> None:
    """Layers in debt go first, so a split is followed up before the budget is spent elsewhere."""
    if step is not None:  # one entry per layer at a time, so ties never compare steps
        heapq.heappush(heap, (not st.in_debt, -step.priority, layer, step))


def _result(current: PlacementPlan, states: dict[int, _Layer]) -> tuple[PlacementPlan, list[Move]]:
    moves = []
    for layer, st in states.items():
        for group, slot in zip(*np.nonzero(st.p2l != st.orig)):
            group, slot = int(group), int(slot)
            moves.append(Move(layer, group, slot, int(st.orig[group, slot]), int(st.p2l[group, slot]),
                              st.kinds[group, slot]))
    if not moves:
        return current, []
    p2l = current.physical_to_logical.clone()
    for layer, st in states.items():
        p2l[layer] = torch.from_numpy(st.p2l)
    return PlacementPlan(p2l, current.num_experts, current.version + 1), moves


# --- choosing a layer's next step -----------------------------------------------------------------


def _best_step(st: _Layer, budget: int) -> _Step | None:
    """The layer's best affordable step (cost <= budget), or None when at target or nothing helps."""
    if st.mean <= 0 or st.group_load.max() <= st.target_load * (1 + 1e-12):
        return None
    return _split(st, budget) or _rebalance(st, budget)


def _overload(group_load: np.ndarray, target_load: float) -> np.ndarray:
    """group_load [..., G] -> [...]: F = max + sum of the excess over target (what steps lower)."""
    return group_load.max(-1) + np.maximum(group_load - target_load, 0).sum(-1)


def _priority(gain: np.ndarray, cost: np.ndarray, shared: np.ndarray, ok: np.ndarray, mean: float) -> np.ndarray:
    """gain [C] tokens, cost [C] loads, shared [C] node-sharing, ok [C] -> [C] priority (-inf = not ok)."""
    value = gain / mean * np.where(shared, NODE_SHARING_DISCOUNT, 1.0)
    priority = np.where(cost > 0, value / np.maximum(cost, 1), value * FREE)
    return np.where(ok, priority, -np.inf)


def _open_slots(st: _Layer, closed: np.ndarray, donors: np.ndarray):
    """Slots that can take an expert: empty, or an unpinned copy of a donor expert, outside the
    closed groups. closed [G] bool, donors [E] bool
    -> (groups [D], slots [D], old experts [D], delta [D, G] group loads change when each is emptied)."""
    old = st.p2l
    usable = (old < 0) | (donors[old.clip(min=0)] & (old >= 0) & ~st.pinned)
    usable[closed] = False
    groups, slots = np.nonzero(usable)
    olds = old[groups, slots]
    has, safe = olds >= 0, olds.clip(min=0)
    others = st.present[safe] & (np.arange(len(closed)) != groups[:, None])  # [D, G] the donor's other copies
    delta = np.where(has[:, None], others * (st.after_drop - st.share)[safe, None], 0.0)
    delta[np.arange(len(groups)), groups] -= np.where(has, st.share[safe], 0.0)
    return groups, slots, olds, delta


def _load_cost(st: _Layer, new: np.ndarray, groups: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Loads added by putting `new` (broadcast against groups/slots) where the slots now hold p2l."""
    orig, now = st.orig[groups, slots], st.p2l[groups, slots]
    return ((new >= 0) & (new != orig)).astype(np.int64) - ((now >= 0) & (now != orig))


def _split(st: _Layer, budget: int) -> _Step | None:
    """One more copy of an expert whose copies carry more than SPLIT_LEVEL: of every such expert and
    open slot, the pair that leaves the layer best off (a fresh node, the lowest busiest group, the
    lowest F), so that a split the budget cannot follow up does the least harm. None if none fits."""
    hot = (st.replicas < st.limits.max_replicas_per_expert) & (st.share > st.split_load)
    if not hot.any():
        return None
    experts = np.nonzero(hot)[0]  # [I]
    donors = (st.replicas > 1) & (st.after_drop < (1 - SPLIT_MARGIN) * st.share[experts].max())
    groups, slots, olds, delta = _open_slots(st, st.closed, donors)  # [D]
    donor_after = np.where(olds >= 0, st.after_drop[olds.clip(min=0)], 0.0)  # [D] 0 for an empty slot
    cost = _load_cost(st, experts[:, None], groups[None], slots[None])  # [I, D]
    valid = ~st.present[experts][:, groups] & (cost <= budget) \
        & (donor_after[None] < (1 - SPLIT_MARGIN) * st.share[experts][:, None])
    pair_i, pair_d = np.nonzero(valid)  # [C]
    if len(pair_i) == 0:
        return None
    e, h = experts[pair_i], groups[pair_d]
    added = st.load[e] / (st.replicas[e] + 1)  # [C] what each copy of e carries afterwards
    changed = st.group_load + st.present[e] * (added - st.share[e])[:, None] + delta[pair_d]  # [C, G]
    changed[np.arange(len(e)), h] += added
    if st.closed.any():  # no later step could repair a lifted busiest group by filling a closed group
        keep = np.nonzero(changed.max(-1) <= st.group_load.max() * (1 + 1e-12))[0]
        if len(keep) == 0:
            return None
        pair_i, pair_d, e, h, added, changed = (x[keep] for x in (pair_i, pair_d, e, h, added, changed))
    shared = st.node_copies[e, st.node_of[h]] > 0  # [C]
    pick = np.lexsort((_overload(changed, st.target_load), changed.max(-1), shared))[0]
    gain = st.share[e[pick]] - max(added[pick], donor_after[pair_d[pick]])
    priority = _priority(np.array([gain]), cost[pair_i[pick], pair_d[pick]][None], shared[pick:pick + 1],
                         np.array([True]), st.mean)
    return _Step(float(priority[0]), int(cost[pair_i[pick], pair_d[pick]]), "replicate",
                 ((int(h[pick]), int(slots[pair_d[pick]]), int(e[pick])),))


def _rebalance(st: _Layer, budget: int) -> _Step | None:
    """The best drop / replicate / move / swap out of the busiest group, by F gain per load."""
    busiest = int(np.argmax(st.group_load))
    top = st.group_load[busiest]
    sources = np.nonzero(st.p2l[busiest] >= 0)[0]  # [I] slots of b
    closed = (np.arange(st.p2l.shape[0]) == busiest) | st.closed
    open_slots = _open_slots(st, closed, st.spare)  # where replicate and move may put a copy
    now = _overload(st.group_load, st.target_load)
    best = None
    for kind, scored in (("drop", _drops(st, busiest, sources)),
                         ("replicate", _fill(st, busiest, sources, open_slots, replicate=True)),
                         ("move", _fill(st, busiest, sources, open_slots, replicate=False)),
                         ("swap", _swaps(st, busiest, sources))):
        if scored is None:
            continue
        after, new_top, cost, shared, changes = scored  # each [C]; changes: index -> slot changes
        gain = now - after
        ok = (new_top <= top * (1 + 1e-12)) & (gain > 1e-9 * st.mean) & (gain >= st.limits.min_gain * top)
        priority = _priority(gain, cost, shared, ok & (cost <= budget), st.mean)
        pick = int(np.argmax(priority))
        if priority[pick] > -np.inf and (best is None or priority[pick] > best.priority):
            best = _Step(float(priority[pick]), int(cost[pick]), kind, changes(pick))
    return best


def _drops(st: _Layer, b: int, sources: np.ndarray):
    experts = st.p2l[b, sources]  # [I]
    keep = st.spare[experts] & ~st.pinned[b, sources]
    slots, experts = sources[keep], experts[keep]
    if len(slots) == 0:
        return None
    others = st.present[experts] & (np.arange(st.p2l.shape[0]) != b)  # [I, G]
    changed = st.group_load + others * (st.after_drop - st.share)[experts, None]  # [I, G]
    changed[:, b] -= st.share[experts]
    cost = _load_cost(st, np.int64(-1), np.full(len(slots), b), slots)
    return _overload(changed, st.target_load), changed.max(-1), cost, np.zeros(len(slots), dtype=bool), \
        lambda k: ((b, int(slots[k]), -1),)


def _fill(st: _Layer, b: int, sources: np.ndarray, open_slots: tuple, replicate: bool):
    """Replicate (keep b's copy) or move (empty b's slot) each expert of b into each open slot.
    Only pairs that keep the destination group at or below b's load are scored (most are not)."""
    sources = sources[st.replicas[st.p2l[b, sources]] < st.limits.max_replicas_per_expert] if replicate \
        else sources[~st.pinned[b, sources]]
    experts = st.p2l[b, sources]  # [I]
    groups, slots, olds, delta = open_slots  # [D]
    top = st.group_load[b]
    added = st.load[experts] / (st.replicas[experts] + 1) if replicate else st.share[experts]  # [I] per new copy
    dest = st.group_load[groups] + delta[np.arange(len(groups)), groups]  # [D] h once its slot is emptied
    useful = (dest[None] + added[:, None] <= top * (1 + 1e-12)) & ~st.present[experts][:, groups]  # anti-affinity
    pair_i, pair_d = np.nonzero(useful)  # [C]
    if len(pair_i) == 0:
        return None
    e, h = experts[pair_i], groups[pair_d]
    if replicate:
        change_e = st.present[e] * (added[pair_i] - st.share[e])[:, None]  # [C, G] every copy of e lighter
    else:
        change_e = np.zeros((len(e), len(st.group_load)))
        change_e[:, b] = -added[pair_i]
    changed = st.group_load + change_e + delta[pair_d]  # [C, G]
    changed[np.arange(len(e)), h] += added[pair_i]
    copies = st.node_copies[e, st.node_of[h]]  # [C] copies of e on h's node
    cost = _load_cost(st, e, h, slots[pair_d])
    if not replicate:
        copies = copies - (st.node_of[h] == st.node_of[b])
        cost = cost + _load_cost(st, np.int64(-1), np.full(len(e), b), sources[pair_i])

    def changes(k: int):
        put = (int(h[k]), int(slots[pair_d[k]]), int(e[k]))
        return (put,) if replicate else (put, (b, int(sources[pair_i[k]]), -1))

    return _overload(changed, st.target_load), changed.max(-1), cost, copies > 0, changes


def _swaps(st: _Layer, b: int, sources: np.ndarray):
    """Exchange an expert e of b with an expert f of another group h: only b and h change.
    Only pairs that lower b without lifting h to b's load are scored (most pairs are not)."""
    if st.closed[b]:
        return None  # a swap puts an expert into b
    sources = sources[~st.pinned[b, sources]]
    occupied = (st.p2l >= 0) & ~st.pinned
    occupied[b] = False
    occupied[st.closed] = False
    groups, slots = np.nonzero(occupied)  # [D]
    experts, others = st.p2l[b, sources], st.p2l[groups, slots]  # [I], [D]
    loads = st.group_load
    diff = st.share[experts][:, None] - st.share[others][None]  # [I, D] load that moves from b to h
    useful = (diff > 0) & (loads[groups][None] + diff < loads[b]) \
        & ~st.present[experts][:, groups] & ~st.present[others, b][None]  # anti-affinity both ways
    pair_i, pair_d = np.nonzero(useful)  # [C]
    if len(pair_i) == 0:
        return None
    e, s, h, t, f = experts[pair_i], sources[pair_i], groups[pair_d], slots[pair_d], others[pair_d]
    moved = diff[pair_i, pair_d]
    new_b, new_h = loads[b] - moved, loads[h] + moved
    rest = loads.copy()
    rest[b] = -np.inf
    first, second = np.argsort(-rest, kind="stable")[:2]
    rest_top = np.where(h == first, rest[second] if len(loads) > 2 else -np.inf, rest[first])  # [C]
    excess = np.maximum(loads - st.target_load, 0)
    new_top = np.maximum(np.maximum(new_b, new_h), rest_top)
    after = new_top + excess.sum() - excess[b] - excess[h] + np.maximum(new_b - st.target_load, 0) \
        + np.maximum(new_h - st.target_load, 0)
    cost = _load_cost(st, e, h, t) + _load_cost(st, f, np.full(len(s), b), s)
    same_node = st.node_of[h] == st.node_of[b]  # [C] leaving b's node frees a copy there
    shared = (st.node_copies[e, st.node_of[h]] - same_node > 0) | (st.node_copies[f, st.node_of[b]] - same_node > 0)
    return after, new_top, cost, shared, \
        lambda k: ((int(h[k]), int(t[k]), int(e[k])), (b, int(s[k]), int(f[k])))
