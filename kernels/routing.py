"""Expert routing: router logits -> (top-k weights, top-k expert ids) for every MoE family.

Every MoE layer starts here: the gate's logits `[T, E]` pick `K` logical experts per token and
the weights that scale their outputs. Families differ only in this step, so there is one kind
per scoring rule, chosen by name through the `_KINDS` registry:

    softmax_topk                  Mixtral (renormalize=True), Qwen2-MoE, Qwen3-MoE, OLMoE
    sigmoid_group_topk            DeepSeek-V3 (e_score_correction_bias, n_group, topk_group)
    softmax_group_limited_greedy  DeepSeek-V2 group_limited_greedy; its "greedy" is num_groups=1
    topk_softmax                  GPT-OSS: top-k of the logits, softmax over those k

Parity with transformers 5.23 is bit for bit, K order included: HF's default `grouped_mm` experts
sum the K outputs in this order, so each kind calls `torch.topk` with HF's `sorted` flag (True for
the softmax families, False for DeepSeek, whose K order is then torch's: unspecified and
device-dependent, but the same as HF's on the same device).
Each kind has a `*_reference`, a per-token Python loop, slow and obvious, to test against.
`G'` in shapes is DeepSeek's `n_group` (routing groups), not `G`, the expert-group actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Bias = Tensor | None
DEEPSEEK_EPS = 1e-20  # DeepSeek adds it to the renormalisation denominator; Mixtral/Qwen/OLMoE add nothing


@dataclass(frozen=True)
class RoutingConfig:
    """How one MoE layer routes (HF's names in comments)."""

    kind: str  # a key of _KINDS
    top_k: int  # num_experts_per_tok
    renormalize: bool = False  # norm_topk_prob; Mixtral always renormalises
    num_groups: int = 1  # n_group (DeepSeek)
    topk_group: int = 1  # topk_group (DeepSeek): groups kept per token
    scaling_factor: float = 1.0  # routed_scaling_factor (DeepSeek)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"RoutingConfig.kind={self.kind!r} is not one of {sorted(_KINDS)}")
        if self.top_k < 1:
            raise ValueError(f"RoutingConfig.top_k={self.top_k} must be >= 1")
        if self.num_groups < 1:
            raise ValueError(f"RoutingConfig.num_groups={self.num_groups} must be >= 1")
        if not 1 <= self.topk_group <= self.num_groups:
            raise ValueError(
                f"RoutingConfig.topk_group={self.topk_group} not in [1, num_groups={self.num_groups}]"
            )
        if not _KINDS[self.kind].is_grouped and (self.num_groups, self.topk_group) != (1, 1):
            raise ValueError(
                f"RoutingConfig.kind={self.kind!r} has no expert groups: num_groups={self.num_groups} and "
                f"topk_group={self.topk_group} must be 1"
            )
        if not self.scaling_factor > 0:
            raise ValueError(f"RoutingConfig.scaling_factor={self.scaling_factor} must be > 0")


def route(
    router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None
) -> tuple[Tensor, Tensor]:
    """`router_logits [T, E]` (any float dtype) -> (`topk_weights [T, K]` f32, `topk_ids [T, K]` int64).

    `correction_bias [E]` is DeepSeek-V3's `e_score_correction_bias` (steers selection only; None = 0).
    Scores are taken in float32 of the logits as given. HF computes DeepSeek's gate matmul in float32
    and the other families' in the model dtype, so for parity pass logits made the family's way.
    """
    _check_call(router_logits, config, correction_bias)
    return _KINDS[config.kind].route(router_logits, config, correction_bias)


def route_reference(
    router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None
) -> tuple[Tensor, Tensor]:
    """`route` by the kind's per-token reference loop (ids best-first, ties to the lower id)."""
    _check_call(router_logits, config, correction_bias)
    return _KINDS[config.kind].reference(router_logits, config, correction_bias)


# --- vectorised kinds: router_logits [T, E] -> (weights [T, K] float32, ids [T, K] int64) --------


def softmax_topk(router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None):
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: softmax over all E, top-k, renormalise with no epsilon.

    (HF's Qwen/OLMoE routers then cast the weights to the logits' dtype; Mixtral's stay float32.)
    """
    probs = router_logits.float().softmax(dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, config.top_k, dim=-1)  # [T, K], best first
    if config.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return _scaled(weights, config), ids


def topk_softmax(router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None):
    """GPT-OSS: top-k of the raw logits, then a softmax over just those k, in the logits' dtype as
    transformers takes it (the weights of a renormalised softmax over all E, rounded another way)."""
    values, ids = torch.topk(router_logits, config.top_k, dim=-1)  # [T, K], best first
    return _scaled(values.softmax(dim=-1).float(), config), ids


def sigmoid_group_topk(router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None):
    """DeepSeek-V3: the bias steers *which* experts (load balancing); weights stay unbiased sigmoids.

    A group scores the sum of its two best biased scores; the best `topk_group` groups stay.
    """
    scores = router_logits.float().sigmoid()  # [T, E]
    biased = scores if correction_bias is None else scores + correction_bias.float()  # [T, E]
    num_tokens, num_experts = biased.shape
    grouped = biased.view(num_tokens, config.num_groups, num_experts // config.num_groups)  # [T, G', E/G']
    kept = _kept_experts(grouped.topk(2, dim=-1).values.sum(dim=-1), config, num_experts)  # [T, E]
    ids = torch.topk(biased.masked_fill(~kept, float("-inf")), config.top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)  # [T, K]
    if config.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + DEEPSEEK_EPS)
    return _scaled(weights, config), ids


def softmax_group_limited_greedy(router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None):
    """DeepSeek-V2: softmax; a group scores its best expert; keep `topk_group` groups, then top-k.

    HF 5.23 ignores `norm_topk_prob` for DeepSeek-V2 (so pass renormalize=False for parity); when
    set, we renormalise as DeepSeek's own code does (denominator + 1e-20), then scale.
    """
    probs = router_logits.float().softmax(dim=-1)  # [T, E]
    num_tokens, num_experts = probs.shape
    grouped = probs.view(num_tokens, config.num_groups, num_experts // config.num_groups)  # [T, G', E/G']
    kept = _kept_experts(grouped.max(dim=-1).values, config, num_experts)  # [T, E]
    probs = probs.masked_fill(~kept, 0.0)  # HF fills 0, not -inf
    weights, ids = torch.topk(probs, config.top_k, dim=-1, sorted=False)  # [T, K]
    if config.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + DEEPSEEK_EPS)
    return _scaled(weights, config), ids


def _scaled(weights: Tensor, config: RoutingConfig) -> Tensor:
    """weights * scaling_factor; a factor of 1 (most families) costs no op: x * 1.0 is x, bit for bit."""
    return weights if config.scaling_factor == 1 else weights * config.scaling_factor


def _kept_experts(group_scores: Tensor, config: RoutingConfig, num_experts: int) -> Tensor:
    """`group_scores [T, G']` -> bool `[T, E]`: is the expert's group among the best `topk_group`?"""
    group_ids = torch.topk(group_scores, config.topk_group, dim=-1, sorted=False).indices  # [T, topk_group]
    kept_groups = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)  # [T, G']
    return kept_groups.repeat_interleave(num_experts // config.num_groups, dim=1)


# --- references: one token at a time, selection by Python sort ----------------------------------


def _best(values: list[float], k: int, candidates) -> list[int]:
    """The `k` candidates with the largest values, best first, ties to the lower index."""
    return sorted(candidates, key=lambda i: (-values[i], i))[:k]


def _kept_candidates(group_scores: list[float], config: RoutingConfig, size: int) -> list[int]:
    """Experts of the best `topk_group` groups (group g holds experts g*size .. g*size+size-1)."""
    kept = _best(group_scores, config.topk_group, range(config.num_groups))
    return [e for g in kept for e in range(g * size, (g + 1) * size)]


def _finish(rows: list[tuple[Tensor, list[int]]], config: RoutingConfig, eps: float):
    """Per token (scores [E], chosen ids) -> (weights [T, K], ids [T, K])."""
    weights = torch.zeros(len(rows), config.top_k)
    ids = torch.zeros(len(rows), config.top_k, dtype=torch.int64)
    for t, (scores, chosen) in enumerate(rows):
        w = scores[chosen]  # [K]
        if config.renormalize:
            w = w / (w.sum() + eps)
        weights[t], ids[t] = w * config.scaling_factor, torch.tensor(chosen)
    return weights, ids


def softmax_topk_reference(router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None):
    rows = []
    for logits in router_logits:  # [E]
        probs = torch.softmax(logits.float(), dim=-1)
        rows.append((probs, _best(probs.tolist(), config.top_k, range(len(probs)))))
    return _finish(rows, config, eps=0.0)


def topk_softmax_reference(router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None):
    weights, ids = [], []
    for logits in router_logits:  # [E]
        chosen = _best(logits.tolist(), config.top_k, range(len(logits)))
        weights.append(torch.softmax(logits[chosen], dim=-1).float() * config.scaling_factor)
        ids.append(chosen)
    return torch.stack(weights), torch.tensor(ids, dtype=torch.int64)


def sigmoid_group_topk_reference(router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None):
    rows = []
    for logits in router_logits:  # [E]
        scores = torch.sigmoid(logits.float())
        biased = scores if correction_bias is None else scores + correction_bias.float()
        size = len(scores) // config.num_groups
        top2_sums = [biased[g * size:(g + 1) * size].sort(descending=True).values[:2].sum().item()
                     for g in range(config.num_groups)]
        candidates = _kept_candidates(top2_sums, config, size)
        rows.append((scores, _best(biased.tolist(), config.top_k, candidates)))
    return _finish(rows, config, eps=DEEPSEEK_EPS)


def softmax_group_limited_greedy_reference(
    router_logits: Tensor, config: RoutingConfig, correction_bias: Bias = None
):
    rows = []
    for logits in router_logits:  # [E]
        probs = torch.softmax(logits.float(), dim=-1).tolist()
        size = len(probs) // config.num_groups
        group_maxes = [max(probs[g * size:(g + 1) * size]) for g in range(config.num_groups)]
        candidates = _kept_candidates(group_maxes, config, size)
        rows.append((torch.tensor(probs), _best(probs, config.top_k, candidates)))
    return _finish(rows, config, eps=DEEPSEEK_EPS)


# --- registry and call-time checks ----------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    route: Callable[..., tuple[Tensor, Tensor]]
    reference: Callable[..., tuple[Tensor, Tensor]]
    is_grouped: bool  # uses num_groups / topk_group
    uses_correction_bias: bool
    min_group_size: int = 1  # experts a group needs to be scored


_KINDS: dict[str, _Kind] = {
    "softmax_topk": _Kind(softmax_topk, softmax_topk_reference, False, False),
    "topk_softmax": _Kind(topk_softmax, topk_softmax_reference, False, False),
    "sigmoid_group_topk": _Kind(sigmoid_group_topk, sigmoid_group_topk_reference, True, True, 2),
    "softmax_group_limited_greedy": _Kind(
        softmax_group_limited_greedy, softmax_group_limited_greedy_reference, True, False
    ),
}
ROUTING_KINDS = tuple(_KINDS)


def _check_call(router_logits: Tensor, config: RoutingConfig, correction_bias: Bias) -> None:
    """Errors a caller causes with a config or bias that does not fit the logits."""
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        shape = tuple(router_logits.shape)
        raise ValueError(f"router_logits must be float [T, E], got {router_logits.dtype} {shape}")
    kind, num_experts = _KINDS[config.kind], router_logits.shape[1]
    if num_experts % config.num_groups:
        raise ValueError(f"RoutingConfig.num_groups={config.num_groups} does not divide E={num_experts}")
    group_size = num_experts // config.num_groups
    if group_size < kind.min_group_size:
        raise ValueError(f"RoutingConfig.num_groups={config.num_groups} leaves {group_size} experts per "
                         f"group; kind={config.kind!r} needs >= {kind.min_group_size}")
    if config.top_k > config.topk_group * group_size:
        raise ValueError(f"RoutingConfig.top_k={config.top_k} > the {config.topk_group * group_size} experts "
                         f"it may choose from (E={num_experts}, num_groups={config.num_groups}, "
                         f"topk_group={config.topk_group})")
    if correction_bias is not None and not kind.uses_correction_bias:
        raise ValueError(f"RoutingConfig.kind={config.kind!r} takes no correction_bias")
    if correction_bias is not None and tuple(correction_bias.shape) != (num_experts,):
        raise ValueError(f"correction_bias must be [E]=({num_experts},), got {tuple(correction_bias.shape)}")
