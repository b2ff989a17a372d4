"""`ClientLoad`: which client sent the tokens each expert received — to catch expert saturation.

A client that crafts inputs to pile onto a few experts (the design card's security concern) shows
up as a routing distribution far more concentrated than everyone else's. The router tells this
table who owns each token of a step (`set_owners`), and every MoE layer's routed pairs are added
to the owner's row of the open step: one bincount per layer whatever the number of clients, and one
`index_add_` into the table per step (`end_step`).
Rows live in a fixed table `[C, L, E]` (int32; `capacity` clients, the least recently seen one
evicted when full), so memory stays bounded on any traffic.

`concentration` (pure) scores a client per layer: the share of its routed pairs that land on its
own `top` busiest experts, over the same measure for everyone else's traffic taken together (the
share of their pairs on *their* `top` busiest experts); the mean over layers is its score. An
ordinary client, routed like the population, scores about 1 (a little less: the population's
busiest experts include everyone's hot spots); a client whose every token hits the same experts
scores up to E / top. Comparing concentration with concentration, not shares of the same experts,
keeps one heavy attacker from making everyone else look concentrated.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor


class ClientLoad:
    def __init__(self, num_layers: int, num_experts: int, capacity: int = 256):
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self.table = torch.zeros(capacity, num_layers, num_experts, dtype=torch.int32)  # [C, L, E]
        self.slots: OrderedDict[str, int] = OrderedDict()  # client -> row, least recently seen first
        self.owners: Tensor | None = None  # [T] row of each token of the current step
        self._used: Tensor | None = None  # [U] the table rows the step's tokens belong to
        self._token_owner: Tensor | None = None  # [T] index into _used of each token
        self._pair_owner: Tensor | None = None  # [T*K] the same per routed pair, for the step's K
        self._step: Tensor | None = None  # [L, U, E] the open step's pairs, folded into the table by end_step

    def set_owners(self, clients: list[str], num_tokens: list[int]) -> None:
        """The step's tokens, in batch order: num_tokens[i] of them belong to clients[i]. (Again on a
        replayed step: the failed attempt's counts are dropped.)"""
        rows = torch.tensor([self._row(c) for c in clients], dtype=torch.long)
        self.owners = torch.repeat_interleave(rows, torch.tensor(num_tokens, dtype=torch.long))
        self._used, self._token_owner = torch.unique(self.owners, return_inverse=True)
        self._pair_owner = None
        self._step = torch.zeros(self.num_layers, len(self._used), self.num_experts, dtype=torch.long)

    def add(self, moe_layer: int, topk_ids: Tensor) -> None:
        """topk_ids [T, K] of the step whose owners were set: one bincount into the open step."""
        if self.owners is None or self.owners.numel() != topk_ids.shape[0]:
            return
        k = topk_ids.shape[1]
        if self._pair_owner is None or self._pair_owner.numel() != topk_ids.numel():
            self._pair_owner = self._token_owner.repeat_interleave(k) * self.num_experts  # [T*K]
        pairs = self._pair_owner + topk_ids.reshape(-1)  # [T*K] owner * E + expert
        self._step[moe_layer].view(-1).add_(torch.bincount(pairs, minlength=self._step[moe_layer].numel()))

    def end_step(self) -> None:
        """Fold the step's counts into the table, one `index_add_` for all layers and clients."""
        if self._step is not None:
            self.table.index_add_(0, self._used, self._step.transpose(0, 1).to(torch.int32))
        self.owners = self._used = self._token_owner = self._pair_owner = self._step = None

    def counts(self) -> dict[str, Tensor]:
        """client -> [L, E] routed pairs since it was first seen (or last evicted)."""
        return {client: self.table[row].clone() for client, row in self.slots.items()}

    def _row(self, client: str) -> int:
        if client in self.slots:
            self.slots.move_to_end(client)
            return self.slots[client]
        if len(self.slots) < self.capacity:
            row = len(self.slots)
        else:
            _, row = self.slots.popitem(last=False)  # evict the least recently seen
            self.table[row].zero_()
        self.slots[client] = row
        return row


def concentration(counts: dict[str, Tensor], top: int) -> dict[str, dict]:
    """client -> {"pairs", "score", "hot_experts" [L][top]}: how much more a client's traffic
    concentrates on its own busiest experts than everyone else's does on theirs."""
    if not counts:
        return {}
    population = torch.stack(list(counts.values())).sum(0).to(torch.float64)  # [L, E]
    out = {}
    for client, mine in counts.items():
        mine = mine.to(torch.float64)
        rest = population - mine
        hot = mine.topk(min(top, mine.shape[1]), dim=1).indices  # [L, top]
        own = mine.gather(1, hot).sum(1) / mine.sum(1).clamp(min=1)  # [L]
        others = rest.topk(hot.shape[1], dim=1).values.sum(1) / rest.sum(1).clamp(min=1)  # [L]
        uniform = hot.shape[1] / mine.shape[1]  # when nobody else has traffic, compare with an even spread
        others = torch.where(rest.sum(1) > 0, others, torch.full_like(others, uniform)).clamp(min=1e-3)
        out[client] = {"pairs": int(mine[0].sum()), "score": float((own / others).mean()),
                       "hot_experts": hot.sort(dim=1).values.tolist()}
    return out


@dataclass(frozen=True)
class ClientPolicy:
    """How the router watches and limits clients (ServingSpec fields of the same names)."""

    saturation_score: float = 1.5  # flag a client whose concentration score reaches this
    saturation_min_pairs: int = 1024  # ... once it has routed at least this many (token, expert) pairs
    token_rate_limit: float | None = None  # tokens/s a client may ask for (prompt + max_tokens); None = no limit
    token_burst_s: float = 10.0  # the bucket holds this many seconds of the rate


class TokenBucket:
    """Per-client token buckets: a request costs its prompt plus max_tokens, charged up front."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.levels: dict[str, tuple[float, float]] = {}  # client -> (tokens left, when)

    def take(self, client: str, cost: float, now: float) -> float | None:
        """Charge `cost`; None if it fits, else the seconds until it would."""
        level, then = self.levels.get(client, (self.burst, now))
        level = min(self.burst, level + (now - then) * self.rate)
        if cost > level:
            self.levels[client] = (level, now)
            return (cost - level) / self.rate
        self.levels[client] = (level - cost, now)
        return None
