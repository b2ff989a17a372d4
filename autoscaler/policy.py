"""The placement policy: a YAML file (`configs/policies/*.yaml`) that steers the autoscaler.

Everything has a default, so an empty file is a valid policy; unknown keys are errors, so a typo
never silently does nothing. `load_policy` reports every problem as `FILE:LINE: field.path:
message`. A policy that validates on its own may still not fit the running model (a pin names
expert 300 of 64): `check_fits` says so with the same field paths, and the caller keeps the last
good policy. `limits` turns the policy into the planner's plain `PlanLimits` for one model.

How the pieces act together (hysteresis, so placement never flaps): when some layer's imbalance
(busiest group / mean group) has stayed above `trigger.imbalance` for `trigger.stabilization_s`,
the controller plans rounds of at most `budget.max_experts_per_round` expert loads each,
`budget.round_spacing_s` apart, until every layer is at or below `target.imbalance` or no move
helps; then it waits `trigger.cooldown_s` before it may trigger again.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

from moeray.autoscaler.planner import PlanLimits, Topology
from moeray.autoscaler.yamlfile import SettingsError, located, parse_mapping, read_mapping, validate


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadSettings(_Section):
    window_s: float = Field(60.0, gt=0, description="seconds of routed tokens each decision looks at")
    source: Literal["window", "ema"] = Field(
        "window", description="'window': plain sum over window_s; 'ema': per-step exponential moving average "
                              "(smoother, weighted to recent steps)")
    min_tokens_per_layer: int = Field(
        1024, ge=0, description="no decision while the window holds fewer routed (token, expert) pairs than this "
                                "per MoE layer (too little traffic to tell hot from noise)")


class Trigger(_Section):
    imbalance: float = Field(1.3, ge=1.0, description="a layer whose busiest group carries more than this times the "
                                                      "mean group's tokens is imbalanced")
    stabilization_s: float = Field(30.0, ge=0, description="how long some layer must stay imbalanced before rebalancing starts")
    cooldown_s: float = Field(120.0, ge=0, description="after a rebalance finishes, seconds before another may start")


class Target(_Section):
    imbalance: float = Field(1.1, ge=1.0, description="a rebalance stops spending budget on a layer once it is at or "
                                                      "below this (keep it under trigger.imbalance: the gap is the hysteresis)")


class Replication(_Section):
    redundant_slots_per_group: int = Field(
        1, ge=0, description="spare slots per group and layer for replicas; sets the plan's shape when the server starts "
                             "(changing it on a running server has no effect until restart)")
    max_replicas_per_expert: int = Field(
        4, ge=1, description="copies of one expert in one layer at most (each in a different group, so a pool of "
                             "G groups holds at most G whatever this says)")


class Budget(_Section):
    max_experts_per_round: int = Field(16, ge=1, description="expert weight loads per migration round")
    max_bytes_per_round: ByteSize | None = Field(
        None, description="weight bytes loaded per round, e.g. '2GiB' (default: only max_experts_per_round limits)")
    round_spacing_s: float = Field(5.0, ge=0, description="seconds between the migration rounds of one rebalance")


class AntiAffinity(_Section):
    nodes: Literal["prefer", "ignore"] = Field(
        "prefer", description="'prefer': put replicas of one expert on different nodes when a slot allows it. "
                              "Replicas never share a group, whatever this says.")


class Pin(_Section):
    expert: int = Field(ge=0, description="logical expert id")
    group: int = Field(ge=0, description="expert group that keeps its copy")
    layers: list[int] | Literal["all"] = Field("all", description="MoE layer indices the pin applies to, or 'all'")


class LayerOverride(_Section):
    layers: list[int] = Field(min_length=1, description="MoE layer indices this override applies to")
    enabled: bool = Field(True, description="false: the autoscaler never changes these layers' placement")
    trigger_imbalance: float | None = Field(None, ge=1.0, description="these layers' own trigger.imbalance")


class Scaling(_Section):
    enabled: bool = Field(False, description="true: the autoscaler adds and removes expert groups by itself within "
                                             "min_groups..max_groups (moeray scale works either way)")
    min_groups: int = Field(1, ge=1, description="fewest expert groups the pool may shrink to")
    max_groups: int = Field(64, ge=1, description="most expert groups the pool may grow to")
    high_utilization: float = Field(
        0.85, gt=0, le=1, description="scale out when batch occupancy (running sequences / max_num_seqs, averaged over "
                                      "the steps since the last look) stays above this")
    low_utilization: float = Field(
        0.3, ge=0, lt=1, description="scale in when batch occupancy stays below this and no request waits; keep it under "
                                     "high_utilization * (G-1)/G so one scale-in does not undo itself")
    max_queue_length: int = Field(
        8, ge=0, description="scale out when more requests than this wait for a place in the batch")
    scale_out_step: int = Field(1, ge=1, description="expert groups added per scale-out")
    scale_in_step: int = Field(1, ge=1, description="expert groups removed per scale-in")
    scale_out_stabilization_s: float = Field(
        60.0, ge=0, description="how long the pressure (queue, occupancy, or imbalance placement cannot fix) must hold "
                                "before a scale-out")
    scale_in_stabilization_s: float = Field(
        600.0, ge=0, description="how long the pool must stay idle (low occupancy, empty queue) before a scale-in")
    scale_out_cooldown_s: float = Field(
        300.0, ge=0, description="after any scale action, seconds before a scale-out may start (a new group needs "
                                 "time to start, stage its experts and show in the load)")
    scale_in_cooldown_s: float = Field(
        900.0, ge=0, description="after any scale action, seconds before a scale-in may start")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_groups > self.max_groups:
            raise ValueError(f"min_groups ({self.min_groups}) is more than max_groups ({self.max_groups})")
        if self.low_utilization >= self.high_utilization:
            raise ValueError(f"low_utilization ({self.low_utilization}) must be below high_utilization "
                             f"({self.high_utilization}), or the pool would flap")
        return self


class Policy(_Section):
    interval_s: float = Field(5.0, gt=0, description="seconds between the controller's looks at the load")
    dry_run: bool = Field(False, description="decide and report (log, metrics, moeray top) but move nothing")
    load: LoadSettings = Field(default_factory=LoadSettings, description="what load the decisions see")
    trigger: Trigger = Field(default_factory=Trigger, description="when a rebalance starts")
    target: Target = Field(default_factory=Target, description="when a rebalance is done")
    replication: Replication = Field(default_factory=Replication, description="how many copies experts may have")
    budget: Budget = Field(default_factory=Budget, description="how much weight a rebalance moves per round")
    anti_affinity: AntiAffinity = Field(default_factory=AntiAffinity, description="where replicas may sit")
    pinned: list[Pin] = Field(default_factory=list, description="expert copies the autoscaler never moves")
    layer_overrides: list[LayerOverride] = Field(default_factory=list, description="per-layer exceptions")
    scaling: Scaling = Field(default_factory=Scaling, description="bounds on the number of expert groups")

    @model_validator(mode="after")
    def _hysteresis(self):
        if self.target.imbalance >= self.trigger.imbalance:
            raise ValueError(f"target.imbalance ({self.target.imbalance}) must be below trigger.imbalance "
                             f"({self.trigger.imbalance}), or placement would flap")
        return self

    def trigger_for(self, layer: int) -> float | None:
        """The imbalance that triggers in `layer`, None where the layer is frozen (last override wins)."""
        threshold: float | None = self.trigger.imbalance
        for override in self.layer_overrides:
            if layer in override.layers:
                threshold = (override.trigger_imbalance or self.trigger.imbalance) if override.enabled else None
        return threshold


PolicyError = SettingsError


def load_policy(path: str | Path) -> Policy:
    text, data = read_mapping(path)
    return validate(Policy, data, text, str(path))


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """A policy from YAML text (what `moeray policy apply` sends to a running server)."""
    return validate(Policy, parse_mapping(text, source), text, source)


def check_fits(policy: Policy, num_layers: int, num_experts: int, num_groups: int, physical_to_logical: list,
               text: str = "", source: str = "<policy>") -> None:
    """Layer, expert and group ids in the policy must exist in the running model and plan, and a pin
    must name a copy the plan has (see `moeray placement show`). PolicyError lists every problem."""
    problems: list[tuple[tuple, str]] = []
    for i, pin in enumerate(policy.pinned):
        if pin.expert >= num_experts:
            problems.append((("pinned", i, "expert"), f"expert {pin.expert} does not exist (the model has {num_experts})"))
        if pin.group >= num_groups:
            problems.append((("pinned", i, "group"), f"group {pin.group} does not exist (the pool has {num_groups})"))
        layers = range(num_layers) if pin.layers == "all" else pin.layers
        for layer in layers:
            if layer >= num_layers:
                problems.append((("pinned", i, "layers"), f"MoE layer {layer} does not exist (the model has {num_layers})"))
            elif pin.expert < num_experts and pin.group < num_groups and pin.expert not in physical_to_logical[layer][pin.group]:
                problems.append((("pinned", i), f"group {pin.group} holds no copy of expert {pin.expert} in MoE layer {layer}"))
                break
    for i, override in enumerate(policy.layer_overrides):
        bad = [layer for layer in override.layers if layer >= num_layers]
        if bad:
            problems.append((("layer_overrides", i, "layers"), f"MoE layer {bad[0]} does not exist (the model has {num_layers})"))
    if problems:
        raise PolicyError(located(text, source, problems))


def limits(policy: Policy, num_layers: int, bytes_per_expert: int) -> PlanLimits:
    """The planner's budget and constraints for one model under this policy."""
    frozen = {layer for layer in range(num_layers) if policy.trigger_for(layer) is None}
    pinned = frozenset((layer, pin.group, pin.expert) for pin in policy.pinned
                       for layer in (range(num_layers) if pin.layers == "all" else pin.layers))
    return PlanLimits(max_moves=policy.budget.max_experts_per_round,
                      max_bytes=None if policy.budget.max_bytes_per_round is None else int(policy.budget.max_bytes_per_round),
                      bytes_per_expert=bytes_per_expert,
                      max_replicas_per_expert=policy.replication.max_replicas_per_expert,
                      target_imbalance=policy.target.imbalance,
                      layers=frozenset(range(num_layers)) - frozen if frozen else None,
                      pinned=pinned)


def topology(policy: Policy, group_nodes: list[int]) -> Topology:
    """Node anti-affinity is soft; 'ignore' tells the planner every group is on its own node."""
    nodes = tuple(group_nodes) if policy.anti_affinity.nodes == "prefer" else tuple(range(len(group_nodes)))
    return Topology(group_nodes=nodes)
