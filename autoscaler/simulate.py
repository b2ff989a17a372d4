"""Replay a load trace through a planner, round by round: what would the autoscaler have done?

Shared by `moeray placement simulate` and `bench/placement.py`. At round r the planner sees window
r's load and the plan in force; its new plan is then judged on window r + 1, the traffic it will
actually serve (judging it on the window it was fitted to would reward chasing noise).

    trace [R, L, E] tokens per logical expert per window -> R - 1 `RoundRecord`s
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from moeray.actors.placement import PlacementPlan
from moeray.autoscaler.planner import Move, PlanLimits, Topology, loads_of, mean_imbalance, plan

Planner = Callable[[Tensor, PlacementPlan, Topology, PlanLimits], tuple[PlacementPlan, list[Move]]]


@dataclass(frozen=True)
class RoundRecord:
    round: int  # r: planned on window r, measured on window r + 1
    imbalance_before: float  # mean over layers, window r + 1, the plan in force (doing nothing)
    imbalance_after: float  # mean over layers, window r + 1, the new plan
    imbalance_fitted: float  # mean over layers, window r (the one planned on), the new plan
    num_loads: int  # slots that load an expert they did not hold
    num_bytes: int  # num_loads * bytes_per_expert
    version: int  # the new plan's version
    moves: tuple[Move, ...]


def simulate(trace: Tensor, initial: PlacementPlan, topology: Topology, limits: PlanLimits,
             planner: Planner = plan) -> list[RoundRecord]:
    """trace [R, L, E] windows (R >= 2) -> R - 1 records; pure: the same inputs give the same records."""
    trace = torch.as_tensor(trace, dtype=torch.float64)
    if trace.dim() != 3 or trace.shape[0] < 2:
        raise ValueError(f"trace must be [windows >= 2, layers, experts], got shape {tuple(trace.shape)}")
    records = []
    current = initial
    for r in range(trace.shape[0] - 1):
        window, next_window = trace[r], trace[r + 1]
        new, moves = planner(window, current, topology, limits)
        loads = loads_of(moves)
        records.append(RoundRecord(
            round=r, imbalance_before=mean_imbalance(current, next_window),
            imbalance_after=mean_imbalance(new, next_window), imbalance_fitted=mean_imbalance(new, window),
            num_loads=loads, num_bytes=loads * limits.bytes_per_expert, version=new.version, moves=tuple(moves)))
        current = new
    return records


def initial_plan(num_layers: int, num_experts: int, num_groups: int, slots_per_group: int) -> PlacementPlan:
    """The default contiguous plan with `slots_per_group` slots: E / G experts per group, the rest
    of each group's slots filled with replicas (DeepSeek-V3: 256 experts, 32 groups, 9 slots)."""
    base = -(-num_experts // num_groups)  # slots the contiguous blocks need
    if slots_per_group < base:
        raise ValueError(f"{num_groups} groups x {slots_per_group} slots cannot hold {num_experts} experts")
    return PlacementPlan.default(num_layers, num_experts, num_groups, redundant_slots=slots_per_group - base)
