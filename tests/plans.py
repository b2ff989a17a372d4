"""Random valid placement plans for property tests (seeded, numpy)."""

import numpy as np
import torch

from moeray.actors.placement import PlacementPlan


def random_plan(rng, num_layers: int, num_experts: int, num_groups: int, slots: int, fill: float = 0.6) -> PlacementPlan:
    """Every expert once per layer, then each empty slot gets a random copy (anti-affinity kept) with
    probability `fill`; the rest stay empty."""
    p2l = np.full((num_layers, num_groups, slots), -1)
    for layer in range(num_layers):
        cells = rng.permutation(num_groups * slots)[:num_experts]
        p2l[layer].reshape(-1)[cells] = rng.permutation(num_experts)
        for g, s in zip(*np.nonzero(p2l[layer] < 0)):
            missing = np.setdiff1d(np.arange(num_experts), p2l[layer, g])
            if rng.random() < fill and len(missing):
                p2l[layer, g, s] = rng.choice(missing)
    return PlacementPlan(torch.tensor(p2l), num_experts, version=int(rng.integers(0, 5)))
