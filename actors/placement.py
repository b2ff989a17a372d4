"""`PlacementPlan`: which logical expert sits in which slot of which expert group, per MoE layer.

Glossary (ARCHITECTURE.md): a *logical expert* is expert e of MoE layer l as the checkpoint
defines it (E per layer). A *physical expert* is one copy of its weights in one *slot* of one
*expert group* (G groups, S slots each per layer). A *replica* is a second or later copy.

Worked example, E=4 experts, G=2 groups, S=3 slots (one redundant slot each), one layer:

    physical_to_logical [L=1, G=2, S=3] = [[[0, 1, 2],      group 0: experts 0, 1 + a replica of 2
                                            [2, 3, 0]]]     group 1: experts 2, 3 + a replica of 0
    physical id p = g * S + s:            0  1  2  3  4  5
    replica_count [L, E]                = [[2, 1, 2, 1]]
    logical_to_physical [L, E, Rmax=2]  = [[[0, 5], [1, -1], [2, 3], [4, -1]]]

Rules every plan obeys (checked on construction): ids are in [-1, E) (-1 = empty slot); every
logical expert has at least one replica in every layer; replicas of one expert never share a
group (anti-affinity: a replica in the same group would add memory, not throughput).
A plan is immutable and carries a `version`; the data plane switches plans only at step
boundaries, all ranks at once, by version number.
"""

import json
from dataclasses import dataclass, field

import torch
from torch import Tensor


class PlanError(ValueError):
    """A plan that breaks a rule; the message names the layer, expert and group."""


@dataclass(frozen=True, eq=False)
class PlacementPlan:
    physical_to_logical: Tensor  # [L, G, S] int64, -1 = empty slot
    num_experts: int  # E
    version: int = 0
    replica_count: Tensor = field(init=False)  # [L, E]
    logical_to_physical: Tensor = field(init=False)  # [L, E, Rmax] physical ids g*S+s, -1 padded

    def __post_init__(self):
        p2l = torch.as_tensor(self.physical_to_logical)
        if p2l.dim() != 3:
            raise PlanError(f"physical_to_logical must be [layers, groups, slots], got shape {tuple(p2l.shape)}")
        if 0 in p2l.shape:
            raise PlanError(f"physical_to_logical needs at least one layer, group and slot, "
                            f"got shape {tuple(p2l.shape)}")
        if p2l.is_floating_point() or p2l.is_complex() or p2l.dtype == torch.bool:
            raise PlanError(f"physical_to_logical must hold integer expert ids, got dtype {p2l.dtype}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise PlanError(f"num_experts must be a positive int, got {self.num_experts!r}")
        p2l = p2l.to(torch.long)
        object.__setattr__(self, "physical_to_logical", p2l)
        _check(p2l, self.num_experts)
        num_layers, experts = p2l.shape[0], self.num_experts
        key = torch.where(p2l >= 0, p2l, experts).reshape(num_layers, -1)  # [L, G*S], empty slots sort last
        order = torch.argsort(key, dim=1, stable=True)  # physical ids grouped by expert, ascending within
        sorted_experts = torch.gather(key, 1, order)
        counts = torch.stack([torch.bincount(row, minlength=experts + 1)[:experts] for row in key])  # [L, E]
        starts = counts.cumsum(1) - counts
        rank = torch.arange(key.shape[1]).expand_as(key) - starts.gather(1, sorted_experts.clamp(max=experts - 1))
        keep = sorted_experts < experts
        layer = torch.arange(num_layers)[:, None].expand_as(key)
        l2p = torch.full((num_layers, experts, int(counts.max())), -1, dtype=torch.long)  # [L, E, Rmax]
        l2p[layer[keep], sorted_experts[keep], rank[keep]] = order[keep]
        object.__setattr__(self, "replica_count", counts)
        object.__setattr__(self, "logical_to_physical", l2p)

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_groups(self) -> int:
        return self.physical_to_logical.shape[1]

    @property
    def slots_per_group(self) -> int:
        return self.physical_to_logical.shape[2]

    def with_version(self, version: int) -> "PlacementPlan":
        return PlacementPlan(self.physical_to_logical, self.num_experts, version)

    def __eq__(self, other) -> bool:
        return (isinstance(other, PlacementPlan) and self.version == other.version
                and self.num_experts == other.num_experts
                and torch.equal(self.physical_to_logical, other.physical_to_logical))

    def changed_slots(self, old: "PlacementPlan") -> dict[int, list[tuple[int, int, int]]]:
        """Per group, the (layer, slot, logical expert) whose weights this plan needs and `old` lacks there."""
        if old.physical_to_logical.shape != self.physical_to_logical.shape:
            raise PlanError(f"plans have different shapes: {tuple(old.physical_to_logical.shape)} "
                            f"vs {tuple(self.physical_to_logical.shape)}")
        changed = (self.physical_to_logical != old.physical_to_logical) & (self.physical_to_logical >= 0)
        out: dict[int, list[tuple[int, int, int]]] = {}
        for layer, group, slot in changed.nonzero().tolist():
            out.setdefault(group, []).append((layer, slot, int(self.physical_to_logical[layer, group, slot])))
        return out

    def group_load(self, load: Tensor) -> Tensor:
        """load [L, E] tokens per logical expert -> [L, G] tokens per group under this plan.

        Dispatch deals an expert's tokens evenly over its replicas, so each physical copy of
        expert e carries load[e] / replica_count[e]."""
        load = torch.as_tensor(load, dtype=torch.float64)
        if load.shape != (self.num_layers, self.num_experts):
            raise PlanError(f"load has shape {tuple(load.shape)}, expected [layers={self.num_layers}, "
                            f"experts={self.num_experts}]")
        share = load / self.replica_count  # [L, E]
        ids = self.physical_to_logical.clamp(min=0)  # [L, G, S]
        per_slot = torch.gather(share, 1, ids.flatten(1)).view_as(ids)  # [L, G, S]
        return per_slot.masked_fill(self.physical_to_logical < 0, 0).sum(-1)

    def imbalance(self, load: Tensor) -> Tensor:
        """[L] per layer: busiest group's tokens over the mean group's (1.0 = perfect; 1.0 when idle)."""
        per_group = self.group_load(load)  # [L, G]
        mean = per_group.mean(-1)
        return torch.where(mean > 0, per_group.amax(-1) / mean.clamp(min=1e-12), torch.ones_like(mean))

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "num_groups": self.num_groups,
                           "slots_per_group": self.slots_per_group,
                           "physical_to_logical": self.physical_to_logical.tolist()})

    @classmethod
    def from_json(cls, text: str, num_experts: int | None = None) -> "PlacementPlan":
        """Parse and validate; `num_experts` defaults to the largest id + 1 (pass the model's E)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PlanError(f"plan is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise PlanError(f"plan JSON must be an object, got {type(data).__name__}")
        for key in ("version", "num_groups", "slots_per_group", "physical_to_logical"):
            if key not in data:
                raise PlanError(f"plan JSON has no {key!r}")
        for key in ("version", "num_groups", "slots_per_group"):
            if type(data[key]) is not int:
                raise PlanError(f"plan JSON {key!r} must be an int, got {data[key]!r}")
        _check_ints(data["physical_to_logical"], "physical_to_logical")
        try:
            p2l = torch.tensor(data["physical_to_logical"], dtype=torch.long)
        except (TypeError, ValueError, RuntimeError) as err:
            raise PlanError(f"physical_to_logical must be a [layers][groups][slots] list of ints: {err}") from None
        if p2l.dim() != 3 or p2l.shape[1:] != (data["num_groups"], data["slots_per_group"]):
            raise PlanError(f"physical_to_logical has shape {tuple(p2l.shape)}, expected "
                            f"[layers, {data['num_groups']}, {data['slots_per_group']}]")
        if num_experts is None:
            num_experts = int(p2l.max()) + 1 if p2l.numel() else 0
        return cls(p2l, num_experts, data["version"])

    @classmethod
    def default(cls, num_layers: int, num_experts: int, num_groups: int, redundant_slots: int = 0,
                version: int = 0) -> "PlacementPlan":
        """Contiguous blocks of experts per group (sizes differ by at most one), then each group's
        redundant slots filled with replicas of the least-replicated, lowest-id experts it lacks."""
        if num_groups < 1 or redundant_slots < 0:
            raise PlanError(f"need num_groups >= 1 and redundant_slots >= 0, got {num_groups}, {redundant_slots}")
        if num_groups > num_experts:
            raise PlanError(f"num_groups={num_groups} is more than the {num_experts} experts per layer")
        base, extra = divmod(num_experts, num_groups)
        slots = base + (extra > 0) + redundant_slots
        layer = torch.full((num_groups, slots), -1, dtype=torch.long)  # [G, S]
        replicas = [1] * num_experts
        start = 0
        for g in range(num_groups):
            size = base + (g < extra)
            layer[g, :size] = torch.arange(start, start + size)
            start += size
        for g in range(num_groups):
            for s in range(int((layer[g] >= 0).sum()), slots):
                present = set(layer[g].tolist())
                candidates = [e for e in range(num_experts) if e not in present]
                if not candidates:
                    break
                pick = min(candidates, key=lambda e: (replicas[e], e))
                layer[g, s] = pick
                replicas[pick] += 1
        return cls(layer.expand(num_layers, -1, -1).clone(), num_experts, version)


def _check_ints(value, where: str) -> None:
    """Every leaf of a nested JSON list must be an int (not a float, bool, string or null)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_ints(item, f"{where}[{i}]")
    elif type(value) is not int:
        raise PlanError(f"{where} is {value!r}, expected an int expert id (-1 = empty slot)")


def _check(p2l: Tensor, num_experts: int) -> None:
    bad = (p2l < -1) | (p2l >= num_experts)
    if bad.any():
        layer, group, slot = bad.nonzero()[0].tolist()
        raise PlanError(f"layer {layer} group {group} slot {slot}: expert id {int(p2l[layer, group, slot])} "
                        f"is out of range [-1, {num_experts})")
    for layer in range(p2l.shape[0]):
        present = set(p2l[layer].flatten().tolist())
        missing = [e for e in range(num_experts) if e not in present]
        if missing:
            raise PlanError(f"layer {layer}: logical expert {missing[0]} has no replica (every expert needs one)")
        for group in range(p2l.shape[1]):
            ids = [e for e in p2l[layer, group].tolist() if e >= 0]
            if len(ids) != len(set(ids)):
                dup = next(e for e in ids if ids.count(e) > 1)
                raise PlanError(f"layer {layer} group {group}: expert {dup} appears twice (replicas must sit in different groups)")


def check_plan(plan: PlacementPlan, num_experts: int, num_moe_layers: int) -> None:
    """A plan must fit the model it places: the same E, one plan layer per MoE layer."""
    if plan.num_experts != num_experts:
        raise PlanError(f"plan places {plan.num_experts} experts per layer, the model has {num_experts}")
    if plan.num_layers != num_moe_layers:
        raise PlanError(f"plan has {plan.num_layers} layers, the model has {num_moe_layers} MoE layers")
