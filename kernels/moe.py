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
    inverse    = [3, 0, 1, 2]          (sorted row of each pair: inverse[order[i]] = i)

Weights are fused the way transformers 5 keeps them in memory: `w13 [E, 2I, H]` (gate rows,
then up rows) and `w2 [E, H, I]`.

Numerics (what tests hold us to): every matmul accumulates in float32 and its output is rounded
to the model dtype, the activation runs in the model dtype, and the K expert outputs of a token
are scaled (in the dtype of the top-k weights: float32 for Mixtral, the model dtype for
Qwen-MoE / OLMoE) and summed in float32 in top-k order, then rounded once: the dtypes and order of
transformers' experts, so bf16 results agree with it up to the summation order inside a matmul.

Speed on CPUs without bf16 matrix instructions (AVX2 x86): torch's bf16 matmul there is a
dot-product loop that re-reads the weight for every row, 5-20x slower than float32 MKL for more
than one row. `expert_ffn` then copies each expert's weights into a float32 buffer (exact) and
multiplies in float32, which gives the same float32 accumulation; one-row experts (decode) keep
the bf16 matrix-vector product, which reads the weight once and beats the copy.
"""

import itertools
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

# Where `_needs_float32_matmul`: experts with at most this many rows keep the low-precision matmul.
# It reads the weight once per row; the float32 copy costs about 2-3 such reads (2-core AVX2 VM,
# Mixtral- and OLMoE-sized experts: break-even at 2-4 rows).
MAX_ROWS_LOW_PRECISION_MATMUL = 2


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
    x_sorted = x.index_select(0, order // top_k if top_k > 1 else order)  # [T*K, H]
    return x_sorted, PermuteHandle(order, counts, num_tokens, top_k)


def unpermute(y_sorted: Tensor, handle: PermuteHandle, topk_weights: Tensor) -> Tensor:
    """y_sorted [T*K, H] (expert order), topk_weights [T, K] -> [T, H], summed in top-k order.

    The weighted sum is taken in float32 and cast back, like transformers' experts (see `_weighted_sum`).
    """
    order = handle.order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())  # [T*K] sorted row of each pair
    y = y_sorted.index_select(0, inverse).view(handle.num_tokens, handle.top_k, -1)  # [T, K, H] pair order
    return _weighted_sum(y, topk_weights).to(y_sorted.dtype)


def expert_ffn(x_sorted: Tensor, counts: list[int], w13: Tensor, w2: Tensor) -> Tensor:
    """Grouped SwiGLU: rows of expert e are x_sorted[start_e : start_e + counts[e]].

    x_sorted [N, H]; counts: E ints summing to N; w13 [E, 2I, H]; w2 [E, H, I] -> [N, H].
    One pair of matmuls per expert that has rows; experts without rows cost nothing, so the
    same code is fast for decode (a few rows, a few experts) and prefill (thousands of rows).
    """
    inter = w2.shape[-1]
    upcast = _needs_float32_matmul(w13.dtype, w13.device.type)
    if not upcast and _has_grouped_mm(w13.device.type):  # the same per-expert matmuls, looped in C++
        offsets = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x_sorted.device)  # [E]
        gate_up = F.grouped_mm(x_sorted, w13.transpose(1, 2), offs=offsets)  # [N, 2I]
        act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])  # [N, I]
        return F.grouped_mm(act, w2.transpose(1, 2), offs=offsets)  # [N, H]
    out = torch.empty_like(x_sorted)
    w13_f32 = w2_f32 = None  # one float32 copy of an expert's weights at a time, reused across experts
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        x = x_sorted[rows]  # [n, H]
        if upcast and count > MAX_ROWS_LOW_PRECISION_MATMUL:
            if w13_f32 is None:
                w13_f32 = torch.empty(w13.shape[1:], dtype=torch.float32, device=w13.device)  # [2I, H]
                w2_f32 = torch.empty(w2.shape[1:], dtype=torch.float32, device=w2.device)  # [H, I]
            gate_up = torch.mm(x.float(), w13_f32.copy_(w13[expert]).t()).to(x.dtype)  # [n, 2I]
            act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])  # [n, I]
            out[rows] = torch.mm(act.float(), w2_f32.copy_(w2[expert]).t())  # [n, H], rounded on copy
        else:
            gate_up = torch.mm(x, w13[expert].t())  # [n, 2I]
            act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])  # [n, I]
            torch.mm(act, w2[expert].t(), out=out[rows])  # [n, H]
    return out


def fused_moe(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """All experts local: x [T, H], topk [T, K], w13 [E, 2I, H], w2 [E, H, I] -> [T, H]."""
    if topk_ids.shape[0] == 1:
        return _fused_moe_one_token(x, topk_weights, topk_ids, w13, w2)
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


def _fused_moe_one_token(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """T = 1 (decode of one sequence): its K experts are distinct, one row each, so nothing to sort."""
    inter = w2.shape[-1]
    weights = topk_weights.float()  # [1, K]
    for k, expert in enumerate(topk_ids[0].tolist()):
        gate_up = F.linear(x, w13[expert])  # [1, 2I]
        act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])  # [1, I]
        term = F.linear(act, w2[expert]) * weights[:, k:k + 1]  # [1, H] float32
        out = term if k == 0 else out.add_(term)
    return out.to(x.dtype)


def _weighted_sum(y: Tensor, topk_weights: Tensor) -> Tensor:
    """y [T, K, H], topk_weights [T, K] -> float32 [T, H] = sum over k, in order, of w[t, k] * y[t, k].

    Each product is taken in the promoted dtype of y and the weights, as transformers does: float32
    for Mixtral (float32 weights), the model dtype for Qwen-MoE / OLMoE (their routers round the
    weights to it, see `MoEBlock`); the sum is float32 either way.
    """
    weights = topk_weights.unsqueeze(-1)  # [T, K, 1]
    out = (y[:, 0] * weights[:, 0]).float()  # [T, H]
    for k in range(1, y.shape[1]):
        out += y[:, k] * weights[:, k]  # product rounded to its dtype, then added: no fused multiply-add
    return out


@cache
def _needs_float32_matmul(dtype: torch.dtype, device_type: str) -> bool:
    """True where torch has no fast matmul for this reduced-precision dtype (CPUs without oneDNN bf16/fp16)."""
    if device_type != "cpu" or dtype == torch.float32:
        return False
    if dtype == torch.bfloat16:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return not torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


@cache
def _has_grouped_mm(device_type: str) -> bool:
    """torch's grouped matmul takes every dtype on CPU (torch >= 2.10); on CUDA only bf16, so we loop there."""
    return device_type == "cpu" and hasattr(F, "grouped_mm")
