"""Placement autoscaler vs EPLB: balance on the next window, and how many experts each moves.

    python bench/placement.py                  # DeepSeek-V3 scale, three traces x 30 rounds, ~1.5 min
    python bench/placement.py --quick          # smoke run: 4 layers, 32 experts, 8 groups, 6 rounds
    python bench/placement.py --trace drift --rounds 60 --max-moves 800

Scale (DeepSeek-V3): 58 MoE layers x 256 routed experts, 32 expert groups (GPUs, 8 per node) x 9
slots = 288 physical experts per layer (32 redundant). Each window is 8192 tokens x top-8 per layer:
65,536 (token, expert) pairs drawn from a per-layer popularity by multinomial sampling (with
replacement: a token may draw an expert twice; the noise is what matters, not the routing rule).
Traces, one popularity per layer, experts shuffled per layer:
  zipf       popularity ~ 1 / rank^1.1, fixed: only sampling noise changes between windows
  lognormal  popularity ~ exp(N(0, 1)), fixed
  drift      a lognormal(0.5) base plus 6 hot experts per layer that together draw 30 % of the
             pairs; every 3 windows 2 new experts start heating up (linearly over 3 windows) while
             the 2 that have been hot longest cool down the same way

Replay (`moeray.autoscaler.simulate`): both contenders start from the default contiguous plan
(`initial_plan`); at round r each plans on window r and is measured on window r + 1. EPLB
(`bench/eplb_baseline.py`) recomputes from scratch (replicate by load per copy, then greedy
balanced packing); its groups are relabelled to overlap its previous placement as much as possible
before its loads are counted. moeray runs `autoscaler.planner.plan` under `limits()` below.
A reference row, "floor", is EPLB fed the popularity that window r + 1 was drawn from (an oracle
without sampling noise): what sampling noise alone costs on the next window.

Columns: imbalance = max / mean group load per layer, averaged over layers and rounds, on the
next window; loads/round = slots that receive an expert they did not hold (x 44 MB per DeepSeek-V3
expert in FP8 = GB/round); co-located = copies sharing a group with another copy of the same
expert (summed over layers, worst round); ms/round = planner wall time (moeray's includes building
the `PlacementPlan`). "steady" averages the rounds from `--warmup` on, "all" every round.
Target: moeray's imbalance within 0.02 of EPLB's while it loads <= 20 % of what EPLB loads, and
zero co-located copies.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # eplb_baseline sits beside this script
import eplb_baseline as eplb  # noqa: E402

from moeray.autoscaler.planner import PlanLimits, Topology, plan  # noqa: E402
from moeray.autoscaler.simulate import initial_plan, simulate  # noqa: E402

BYTES_PER_EXPERT = 3 * 7168 * 2048  # DeepSeek-V3 routed expert: gate, up, down in FP8
TRACES = ("zipf", "lognormal", "drift")
REFERENCES = ("no rebalancing", "floor (EPLB on the true popularity)")  # rows without loads


@dataclass(frozen=True)
class Scale:
    num_layers: int  # L
    num_experts: int  # E
    num_groups: int  # G
    slots_per_group: int  # S
    groups_per_node: int
    tokens: int  # per window
    top_k: int


FULL = Scale(num_layers=58, num_experts=256, num_groups=32, slots_per_group=9, groups_per_node=8,
             tokens=8192, top_k=8)
QUICK = Scale(num_layers=4, num_experts=32, num_groups=8, slots_per_group=5, groups_per_node=4, tokens=512, top_k=4)


def limits(scale: Scale, max_moves: int | None = None) -> PlanLimits:
    """moeray's policy for the bench: <= 1503 loads per round at full scale (9 % of the 16,704
    slots, 66 GB), at most half the groups hold one expert, stop a layer at imbalance 1.015 (on the
    window it plans on), and skip steps that lower the layer's overload by < 1 % of its busiest
    group (most of those would chase sampling noise)."""
    slots = scale.num_layers * scale.num_groups * scale.slots_per_group
    return PlanLimits(max_moves=max_moves if max_moves is not None else max(1, slots * 9 // 100),
                      max_bytes=None, bytes_per_expert=BYTES_PER_EXPERT,
                      max_replicas_per_expert=max(1, scale.num_groups // 2), target_imbalance=1.015,
                      min_gain=0.01)


# --- traces: [R, L, E] tokens per logical expert per window ------------------------------------------


def popularity(kind: str, rng: np.random.Generator, scale: Scale, rounds: int) -> np.ndarray:
    """-> [R, L, E] probabilities per window (rows sum to 1)."""
    num_layers, num_experts = scale.num_layers, scale.num_experts
    if kind == "zipf":
        ranks = np.stack([rng.permutation(num_experts) for _ in range(num_layers)]) + 1  # [L, E]
        base = ranks ** -1.1
    elif kind == "lognormal":
        base = np.exp(rng.normal(0.0, 1.0, (num_layers, num_experts)))
    elif kind == "drift":
        return _drift(rng, scale, rounds)
    else:
        raise ValueError(f"unknown trace {kind!r}, expected one of {TRACES}")
    base = base / base.sum(-1, keepdims=True)
    return np.broadcast_to(base, (rounds, num_layers, num_experts))


def _drift(rng: np.random.Generator, scale: Scale, rounds: int, num_hot: int = 6, hot_share: float = 0.3,
           shift_every: int = 3, shift: int = 2) -> np.ndarray:
    """A lognormal(0.5) base plus `num_hot` hot experts per layer drawing `hot_share` of the pairs.
    Every `shift_every` windows `shift` experts start heating up (linearly, over `shift_every`
    windows) while the `shift` that have been hot longest cool down the same way, so the hot mass
    stays constant and each expert stays hot for num_hot / shift * shift_every windows."""
    num_layers, num_experts = scale.num_layers, scale.num_experts
    num_hot = min(num_hot, num_experts // 4)
    shift = min(shift, num_hot)
    lifetime = num_hot // shift * shift_every
    base = np.exp(rng.normal(0.0, 0.5, (num_layers, num_experts)))
    probs = np.repeat(((1 - hot_share) * base / base.sum(-1, keepdims=True))[None], rounds, 0)  # [R, L, E]
    windows = np.arange(rounds)
    first = -(lifetime // shift_every)  # episodes that started before window 0 are fully hot at 0
    for layer in range(num_layers):
        recent: list[np.ndarray] = []
        for start in range(first * shift_every, rounds, shift_every):
            fresh = np.setdiff1d(rng.permutation(num_experts), np.concatenate(recent) if recent else [],
                                 assume_unique=True)
            chosen = rng.choice(fresh, shift, replace=False)
            recent = (recent + [chosen])[-(lifetime // shift_every + 1):]
            heat = np.clip((windows - start) / shift_every, 0, 1) \
                - np.clip((windows - start - lifetime) / shift_every, 0, 1)  # [R] rise, stay, fall
            probs[:, layer, chosen] += (hot_share / num_hot * heat)[:, None]
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator, scale: Scale) -> np.ndarray:
    """probs [R, L, E] -> counts [R, L, E]: tokens * top_k pairs per layer and window."""
    return rng.multinomial(scale.tokens * scale.top_k, probs).astype(np.float64)


# --- the two contenders ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    imbalance: np.ndarray  # mean over layers, next window
    loads: np.ndarray
    colocated: int  # worst round
    seconds: np.ndarray  # planner time


def run_static(trace: np.ndarray, p2l: np.ndarray) -> Run:
    """No rebalancing: the initial plan throughout."""
    imbalance = np.array([eplb.imbalance(p2l, trace[r + 1]).mean() for r in range(len(trace) - 1)])
    zeros = np.zeros(len(trace) - 1)
    return Run(imbalance, zeros, eplb.colocated(p2l), zeros)


def run_floor(probs: np.ndarray, trace: np.ndarray, scale: Scale) -> Run:
    """EPLB on the popularity each next window is drawn from: the sampling-noise floor."""
    imbalance = [eplb.imbalance(eplb.rebalance(probs[r + 1], scale.num_groups, scale.slots_per_group),
                                trace[r + 1]).mean() for r in range(len(trace) - 1)]
    zeros = np.zeros(len(trace) - 1)
    return Run(np.array(imbalance), zeros, 0, zeros)


def run_eplb(trace: np.ndarray, p2l: np.ndarray, scale: Scale) -> Run:
    imbalance, loads, colocated, seconds = [], [], 0, []
    for r in range(len(trace) - 1):
        start = time.perf_counter()
        new = eplb.align(eplb.rebalance(trace[r], scale.num_groups, scale.slots_per_group), p2l)
        seconds.append(time.perf_counter() - start)
        imbalance.append(eplb.imbalance(new, trace[r + 1]).mean())
        loads.append(eplb.loads_between(p2l, new))
        colocated = max(colocated, eplb.colocated(new))
        p2l = new
    return Run(np.array(imbalance), np.array(loads), colocated, np.array(seconds))


def run_moeray(trace: np.ndarray, scale: Scale, plan_limits: PlanLimits) -> Run:
    seconds, colocated = [], [0]

    def timed(load, current, topology, lim):
        start = time.perf_counter()
        new, moves = plan(load, current, topology, lim)
        seconds.append(time.perf_counter() - start)
        colocated[0] = max(colocated[0], eplb.colocated(new.physical_to_logical.numpy()))
        return new, moves

    initial = initial_plan(scale.num_layers, scale.num_experts, scale.num_groups, scale.slots_per_group)
    topology = Topology(tuple(g // scale.groups_per_node for g in range(scale.num_groups)))
    records = simulate(torch.from_numpy(trace), initial, topology, plan_limits, planner=timed)
    return Run(np.array([rec.imbalance_after for rec in records]), np.array([rec.num_loads for rec in records]),
               colocated[0], np.array(seconds))


# --- report ------------------------------------------------------------------------------------------


def table(name: str, runs: dict[str, Run], warmup: int) -> tuple[list[str], dict]:
    """Markdown lines for one trace, and the numbers the target is judged on."""
    eplb_run, ours = runs["EPLB (from scratch)"], runs["moeray"]
    lines = [f"### {name}", "",
             "| contender | imbalance (steady) | imbalance (all) | loads/round (steady) | loads/round (all) "
             "| GB/round (all) | loads vs EPLB (steady / all) | co-located | ms/round |",
             "| --- |" + " --- |" * 8]
    for label, run in runs.items():
        if label in REFERENCES:
            lines.append(f"| {label} | {run.imbalance[warmup:].mean():.4f} | {run.imbalance.mean():.4f} "
                         f"| - | - | - | - | - | - |")
            continue
        ratio = f"{_ratio(run.loads[warmup:], eplb_run.loads[warmup:]):.1%} / {_ratio(run.loads, eplb_run.loads):.1%}"
        lines.append(f"| {label} | {run.imbalance[warmup:].mean():.4f} | {run.imbalance.mean():.4f} "
                     f"| {run.loads[warmup:].mean():,.0f} | {run.loads.mean():,.0f} "
                     f"| {run.loads.mean() * BYTES_PER_EXPERT / 1e9:,.1f} | {ratio} | {run.colocated} "
                     f"| {run.seconds.mean() * 1e3:,.0f} |")
    summary = {"gap_steady": ours.imbalance[warmup:].mean() - eplb_run.imbalance[warmup:].mean(),
               "gap_all": ours.imbalance.mean() - eplb_run.imbalance.mean(),
               "ratio_steady": _ratio(ours.loads[warmup:], eplb_run.loads[warmup:]),
               "ratio_all": _ratio(ours.loads, eplb_run.loads), "colocated": ours.colocated,
               "eplb_colocated": eplb_run.colocated, "seconds": float(ours.seconds.mean())}
    met = summary["gap_steady"] <= 0.02 and summary["ratio_steady"] <= 0.2 and ours.colocated == 0
    lines += ["", f"moeray - EPLB imbalance: {summary['gap_steady']:+.4f} steady, {summary['gap_all']:+.4f} all; "
              f"loads {summary['ratio_steady']:.1%} of EPLB's steady, {summary['ratio_all']:.1%} all; "
              f"target (<= +0.02, <= 20 %, 0 co-located, steady): {'met' if met else 'NOT met'}", ""]
    return lines, summary


def _ratio(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(ours.sum() / max(theirs.sum(), 1))


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 layers, 32 experts, 8 groups, 6 rounds")
    parser.add_argument("--trace", choices=[*TRACES, "all"], default="all")
    parser.add_argument("--rounds", type=int, help="planning rounds per trace (default 30, quick 6)")
    parser.add_argument("--warmup", type=int, help="rounds left out of the steady columns (default 10, quick 2)")
    parser.add_argument("--max-moves", type=int, help="moeray's loads per round (default 9 %% of all slots)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else FULL
    rounds = args.rounds or (6 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    if not 0 <= warmup < rounds:
        raise SystemExit(f"--warmup must be in [0, rounds={rounds}), got {warmup}")
    plan_limits = limits(scale, args.max_moves)
    print(f"L={scale.num_layers} E={scale.num_experts} G={scale.num_groups} S={scale.slots_per_group} "
          f"({scale.groups_per_node} groups per node), {scale.tokens} tokens x top-{scale.top_k} per window, "
          f"{rounds} rounds, steady = rounds {warmup}..{rounds - 1}")
    print(f"moeray limits: max_moves={plan_limits.max_moves} max_replicas_per_expert="
          f"{plan_limits.max_replicas_per_expert} target_imbalance={plan_limits.target_imbalance} "
          f"min_gain={plan_limits.min_gain}", flush=True)
    print("quick: a smoke run; the targets are meant for the full scale\n" if args.quick else "", flush=True)
    initial = initial_plan(scale.num_layers, scale.num_experts, scale.num_groups, scale.slots_per_group)
    results = {}
    for offset, name in enumerate(TRACES if args.trace == "all" else (args.trace,)):
        rng = np.random.default_rng(args.seed + offset)
        probs = popularity(name, rng, scale, rounds + 1)  # [R+1, L, E]
        trace = sample(probs, rng, scale)
        start = initial.physical_to_logical.numpy()
        runs = {"no rebalancing": run_static(trace, start), "floor (EPLB on the true popularity)":
                run_floor(probs, trace, scale), "EPLB (from scratch)": run_eplb(trace, start, scale),
                "moeray": run_moeray(trace, scale, plan_limits)}
        lines, results[name] = table(name, runs, warmup)
        print("\n".join(lines), flush=True)
    return results


if __name__ == "__main__":
    main()
