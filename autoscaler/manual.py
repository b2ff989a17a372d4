"""Operator moves (pure): `moeray placement migrate` changes one expert copy.

    to_group only          replicate: a new copy in a free slot of `to_group`
    from_group + to_group  move: `from_group`'s copy goes to a free slot of `to_group`
    from_group only        drop: `from_group`'s copy is removed (another copy must remain)

The result is a new plan one version up, or a PlanError that says what stands in the way (no
free slot — drop a replica there first —, the expert is already there, the only copy, ids out
of range).
"""

from moeray.actors.placement import PlacementPlan, PlanError


def manual_migrate(plan: PlacementPlan, layer: int, expert: int, to_group: int | None = None,
                   from_group: int | None = None) -> PlacementPlan:
    if to_group is None and from_group is None:
        raise PlanError("name to_group (replicate), from_group (drop) or both (move)")
    for name, value, bound in (("layer", layer, plan.num_layers), ("expert", expert, plan.num_experts),
                               ("to_group", to_group, plan.num_groups), ("from_group", from_group, plan.num_groups)):
        if value is not None and not 0 <= value < bound:
            raise PlanError(f"{name} {value} is out of range [0, {bound})")
    p2l = plan.physical_to_logical.clone()  # [L, G, S]
    if to_group is None:
        row = p2l[layer, from_group].tolist()
        if expert not in row:
            raise PlanError(f"group {from_group} holds no copy of expert {expert} in MoE layer {layer}")
        if int(plan.replica_count[layer, expert]) < 2:
            raise PlanError(f"group {from_group} holds the only copy of expert {expert} in MoE layer {layer}; "
                            "move it instead of dropping it")
        p2l[layer, from_group, row.index(expert)] = -1
        return PlacementPlan(p2l, plan.num_experts, plan.version + 1)
    if expert in p2l[layer, to_group].tolist():
        raise PlanError(f"group {to_group} already holds expert {expert} in MoE layer {layer}")
    free = (p2l[layer, to_group] < 0).nonzero().flatten().tolist()
    if not free:
        raise PlanError(f"group {to_group} has no free slot in MoE layer {layer} "
                        f"(slots: {p2l[layer, to_group].tolist()}); drop a replica there first")
    if from_group is not None:
        row = p2l[layer, from_group].tolist()
        if expert not in row:
            raise PlanError(f"group {from_group} holds no copy of expert {expert} in MoE layer {layer}")
        p2l[layer, from_group, row.index(expert)] = -1
    p2l[layer, to_group, free[0]] = expert
    return PlacementPlan(p2l, plan.num_experts, plan.version + 1)
