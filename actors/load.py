"""`LoadTracker`: how many tokens every logical expert received, per MoE layer, in the router.

The router counts what it routes (`add`, once per MoE layer per step: a bincount of the step's
top-k ids) and closes each step (`end_step`). Counts go three places:
- time buckets (`bucket_s` each, the last `num_buckets` kept) that a snapshot sums over any
  window up to `bucket_s * num_buckets` seconds: the autoscaler's "load over the last 30 s";
- an exponential moving average per step (`ema_alpha`), for a smoother, recency-weighted view;
- a running total since start (Prometheus counters want monotonic values).

Memory is `num_buckets * L * E` counts (60 x 58 x 256 int64 = 7 MiB at DeepSeek-V3 scale); the
per-step cost is one `[E]` add per MoE layer and one `[L, E]` update per step. Pure torch, no
Ray: the actor exposes `snapshot()` as a plain dict.
"""

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from moeray.actors.placement import PlacementPlan


@dataclass(frozen=True)
class LoadSnapshot:
    window: Tensor  # [L, E] tokens per logical expert over the last `window_s` seconds
    ema: Tensor  # [L, E] per-step EMA of tokens per logical expert
    total: Tensor  # [L, E] tokens since start
    window_s: float  # the window the sum covers (the tracker's age, if younger)
    steps: int  # steps since start
    window_steps: int  # steps inside the window
    plan_version: int
    group_load: Tensor  # [L, G] window tokens per group through the active plan
    imbalance: Tensor  # [L] busiest group over the mean group, per layer (1.0 = balanced)

    def to_dict(self) -> dict:
        """JSON-ready: what `RouterActor.load_snapshot` returns and `moeray load dump` writes."""
        return {"window": self.window.tolist(), "ema": self.ema.tolist(), "total": self.total.tolist(),
                "window_s": self.window_s, "steps": self.steps, "window_steps": self.window_steps,
                "plan_version": self.plan_version, "group_load": self.group_load.tolist(),
                "imbalance": self.imbalance.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "LoadSnapshot":
        tensors = {k: torch.tensor(data[k], dtype=torch.float64 if k in ("ema", "group_load", "imbalance") else torch.long)
                   for k in ("window", "ema", "total", "group_load", "imbalance")}
        return cls(window_s=float(data["window_s"]), steps=int(data["steps"]), window_steps=int(data["window_steps"]),
                   plan_version=int(data["plan_version"]), **tensors)


class LoadTracker:
    def __init__(self, num_layers: int, num_experts: int, bucket_s: float = 1.0, num_buckets: int = 300,
                 ema_alpha: float = 0.05, clock: Callable[[], float] = time.monotonic):
        if bucket_s <= 0 or num_buckets < 1 or not 0 < ema_alpha <= 1:
            raise ValueError(f"need bucket_s > 0, num_buckets >= 1, 0 < ema_alpha <= 1; "
                             f"got {bucket_s}, {num_buckets}, {ema_alpha}")
        self.num_experts, self.bucket_s, self.ema_alpha, self.clock = num_experts, bucket_s, ema_alpha, clock
        self.step_counts = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E] the open step
        self.buckets = torch.zeros(num_buckets, num_layers, num_experts, dtype=torch.long)  # ring [N, L, E]
        self.bucket_steps = torch.zeros(num_buckets, dtype=torch.long)  # [N]
        self.ema = torch.zeros(num_layers, num_experts, dtype=torch.float64)  # [L, E]
        self.total = torch.zeros(num_layers, num_experts, dtype=torch.long)  # [L, E]
        self.steps = 0
        self.start = clock()
        self.bucket_index = 0  # absolute index (time since start // bucket_s) of the newest bucket

    def add(self, moe_layer: int, topk_ids: Tensor) -> None:
        """Count one MoE layer's routed pairs: topk_ids [T, K] logical expert ids."""
        self.step_counts[moe_layer] += torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)

    def begin_step(self) -> None:
        """Start counting a step afresh (a failed attempt's partial counts are dropped on replay)."""
        self.step_counts.zero_()

    def end_step(self) -> None:
        """Fold the open step's counts into the bucket, the EMA and the total."""
        slot = self._advance()
        self.buckets[slot] += self.step_counts
        self.bucket_steps[slot] += 1
        self.ema.mul_(1 - self.ema_alpha).add_(self.step_counts, alpha=self.ema_alpha)
        self.total += self.step_counts
        self.steps += 1
        self.step_counts.zero_()

    def snapshot(self, plan: PlacementPlan, window_s: float | None = None) -> LoadSnapshot:
        """Sum of the buckets that end inside the last `window_s` seconds (default: all kept)."""
        self._advance()
        kept = self.buckets.shape[0]
        count = kept if window_s is None else max(1, min(kept, int(-(-window_s // self.bucket_s))))
        count = min(count, self.bucket_index + 1)  # a young tracker has fewer buckets
        slots = [(self.bucket_index - i) % kept for i in range(count)]
        window = self.buckets[slots].sum(0)  # [L, E]
        covered = min(count * self.bucket_s, self.clock() - self.start)
        return LoadSnapshot(window=window, ema=self.ema.clone(), total=self.total.clone(), window_s=covered,
                            steps=self.steps, window_steps=int(self.bucket_steps[slots].sum()),
                            plan_version=plan.version, group_load=plan.group_load(window),
                            imbalance=plan.imbalance(window))

    def _advance(self) -> int:
        """Move to the current time's bucket, zeroing those skipped; returns its ring slot."""
        now_index = int((self.clock() - self.start) // self.bucket_s)
        kept = self.buckets.shape[0]
        for index in range(self.bucket_index + 1, min(now_index, self.bucket_index + kept) + 1):
            self.buckets[index % kept].zero_()
            self.bucket_steps[index % kept] = 0
        self.bucket_index = max(self.bucket_index, now_index)
        return self.bucket_index % kept
