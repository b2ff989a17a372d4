"""The expert half of an MoE layer: permute tokens by expert, run the grouped SwiGLU FFN, unpermute.

The three steps are cut where the distributed data plane cuts them (STYLE.md item 4): routing
(`kernels.routing`) picks `topk_ids [T, K]`; `permute` sorts the T*K (token, expert) pairs by
expert so that each expert's rows are contiguous; `expert_ffn` runs every expert once over its
rows; `unpermute` puts the rows back and sums each token's K results **in top-k order**, so the
result does not depend on which expert (or, later, which group) computed which row.

Worked example: T=2, K=2, topk_ids = [[3, 0], [0, 1]]
    flat ids   = [3, 0, 0, 1]          (pair p = t*K + k)
    order      = [1, 2, 3, 0]          (stable argsort: expert 0's pairs, then 1, then 3)
    counts     = [2, 1, 0, 1]          (rows per expert)
    x_sorted   = x[[0, 1, 1, 0]]       (token of each sorted pair = order // K)

Weights are fused the way transformers 5 keeps them in memory: `w13 [E, 2I, H]` (gate rows,
then up rows) and `w2 [E, H, I]`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PermuteHandle:
    """What `unpermute` needs to undo `permute`. order: [T*K]; counts: [E]; num_tokens: T."""

    order: Tensor
    counts: Tensor
    num_tokens: int
    top_k: int


def permute(x: Tensor, topk_ids: Tensor, num_experts: int) -> tuple[Tensor, PermuteHandle]:
    """x [T, H], topk_ids [T, K] -> (x_sorted [T*K, H] grouped by expert, handle)."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # [T*K]
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    x_sorted = x.index_select(0, order // top_k)  # [T*K, H]
    return x_sorted, PermuteHandle(order, counts, num_tokens, top_k)


def unpermute(y_sorted: Tensor, handle: PermuteHandle, topk_weights: Tensor) -> Tensor:
    """y_sorted [T*K, H] (expert order), topk_weights [T, K] -> [T, H], summed in top-k order.

    The weighted sum is taken in float32 and cast back, like transformers' Mixtral block.
    """
    y = torch.empty_like(y_sorted)
    y[handle.order] = y_sorted  # back to pair order p = t*K + k
    y = y.view(handle.num_tokens, handle.top_k, -1)  # [T, K, H]
    out = torch.bmm(topk_weights.float().unsqueeze(1), y.float()).squeeze(1)  # [T, H]
    return out.to(y_sorted.dtype)


def expert_ffn(x_sorted: Tensor, counts: list[int], w13: Tensor, w2: Tensor) -> Tensor:
    """Grouped SwiGLU: rows of expert e are x_sorted[start_e : start_e + counts[e]].

    x_sorted [N, H]; counts: E ints summing to N; w13 [E, 2I, H]; w2 [E, H, I] -> [N, H].
    One pair of matmuls per expert that has rows; experts without rows cost nothing, so the
    same code is fast for decode (a few rows, a few experts) and prefill (thousands of rows).
    """
    out = torch.empty_like(x_sorted)
    inter = w2.shape[-1]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate_up = torch.mm(x_sorted[rows], w13[expert].t())  # [n, 2I]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        torch.mm(act, w2[expert].t(), out=out[rows])  # [n, H]
        start += count
    return out


def fused_moe(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """All experts local: x [T, H], topk [T, K], w13 [E, 2I, H], w2 [E, H, I] -> [T, H]."""
    x_sorted, handle = permute(x, topk_ids, w13.shape[0])
    y_sorted = expert_ffn(x_sorted, handle.counts.tolist(), w13, w2)
    return unpermute(y_sorted, handle, topk_weights)


def fused_moe_reference(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """The einsum-free, loop-per-token reference the fast path is tested against."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate_up = w13[e].float() @ x[t].float()  # [2I]
            act = F.silu(gate_up[:inter]) * gate_up[inter:]  # [I]
            out[t] += float(topk_weights[t, k]) * (w2[e].float() @ act)  # [H]
    return out.to(x.dtype)
