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
then up rows) and `w2 [E, H, I]`. GPT-OSS's experts add biases (`ExpertBiases`: b13 [E, 2I] and
b2 [E, H]) and a clamped gated activation (`Activation`); the native kernel takes them too
(`native.expert_ffn`'s biases, limit, alpha) where it takes every expert (float32; bf16 where `native.bf16_panels`), the torch
paths (`_expert_ffn_general`) elsewhere.

Numerics (what tests hold us to): every matmul accumulates in float32 and its output is rounded
to the model dtype, the activation runs in the model dtype, and the K expert outputs of a token
are scaled (in the dtype of the top-k weights: float32 for Mixtral, the model dtype for
Qwen-MoE / OLMoE) and summed in float32 in top-k order, then rounded once: the dtypes and order of
transformers' experts, so bf16 results agree with it up to the summation order inside a matmul.
In float32 the scale and sum are one `embedding_bag` (see `combine`), fused multiply-adds in
top-k order: within an ulp of transformers, and the same bits whatever the placement or batch.
(The float32 expert FFN itself sums in one of two orders, by how many rows its expert has: see
`native.PANEL_ROWS`.)

Speed (choices measured with bench/moe_layer.py on a 2-core AVX2 VM):
- CPU, float32, any number of rows; bf16 experts with at most 64 rows (NATIVE_MAX_ROWS; one row on CPUs
  with bf16 matmul instructions, NATIVE_MAX_ROWS_BF16_MATMUL, unless the kernel has its own bf16 GEMMs
  there, `native.bf16_panels`: then all of them): the native
  kernel (`kernels.native`, csrc/cpu_kernels.cpp) runs all of them in one call. With few rows it
  reads each weight once, at the machine's memory bandwidth for a row or two and close to its FMA
  rate for tens, where torch's matmuls pack or re-read it: 1.1-4x faster than the torch paths below.
  Float32 experts with `native.PANEL_ROWS` rows or more are GEMMs of its own, 1.4-1.5x faster than
  MKL's on AVX2 (80-90% of the FMA peak against ~65%), ~2x on AVX-512 (512-bit tiles; MKL runs AVX2
  code on AMD); bf16 the same on AVX512-BF16 CPUs, on vdpbf16ps. A float32 block is one native call
  (`native.fused_moe`: sort, experts, top-k sum), with the bits of the three steps below; so is a bf16
  block where all of its experts run on the kernel (`native.bf16_panels`).
- bf16 with more rows, or any dtype the device multiplies natively: on CPU all experts go through
  one `F.grouped_mm` call per projection (the same per-expert MKL matmuls as a Python loop, bitwise,
  without the per-expert Python overhead), elsewhere through the loop.
- bf16/fp16 on CPUs without oneDNN support for them (x86 without AVX-512 BF16/AMX): torch's
  low-precision matmul is a dot-product loop that streams the whole weight once per row, 4-8x
  slower than float32 MKL at prefill sizes. Experts with more than `MAX_ROWS_LOW_PRECISION_MATMUL`
  rows are multiplied in float32 instead (`_swiglu_float32`): weight rows are converted a
  cache-sized block at a time (exact) and the matmul's outputs rounded back, so the dtypes match
  the low-precision path and only the order of additions inside a matmul changes. Experts with
  fewer rows keep the low-precision matvec, which reads the weight once.
- Where the native kernel cannot be built (no C++ compiler) everything takes the torch paths.
- `fused_moe` takes consecutive experts in cache-sized chunks (3-6% at T=2048); one token
  (decode of one sequence) skips sorting altogether: its K experts are distinct.
"""

import itertools
import sys
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moeray.kernels import native

# Where `_needs_float32_matmul`: experts with at most this many rows keep the low-precision matmul,
# which streams the whole weight once per row; converting it to float32 costs about 3-4 such passes
# (2-core AVX2 VM, Mixtral- and OLMoE-sized experts, 1 and 2 threads: break-even at 3-4 rows).
MAX_ROWS_LOW_PRECISION_MATMUL = 3
# bf16 experts with at most this many rows go to the native kernel (float32 ones always do: it runs
# many rows as GEMMs faster than MKL, see csrc/cpu_kernels.cpp). Measured (2-core AVX2 VM, expert FFN
# alone, 8 experts, against the float32-conversion path): 1.2-8x to 16 rows, 1-1.2x at 64, 0.9-1.05x
# at 128. Beyond, MKL's packed float32 GEMM wins.
NATIVE_MAX_ROWS = 64
# The same where torch multiplies bf16 natively (oneDNN with AVX512-BF16 or AMX): the kernel widens bf16
# to float32 FMAs, half the rate of the bf16 dot-product instructions oneDNN uses. Measured (2-core Zen 4
# VM with AVX512-BF16, 8 Mixtral-like / 64 OLMoE-like experts, against F.grouped_mm): 1.7x / 2.6x at one
# row an expert, 0.7x / 1.07x at two, 0.55x / 0.72x at four, 0.14x at 128.
NATIVE_MAX_ROWS_BF16_MATMUL = 1
# Weight rows converted to float32 per matmul: small enough to stay in cache (L2 + L3) for it.
FLOAT32_BLOCK_BYTES = 2 << 20
# Rows of consecutive experts that `fused_moe` takes at a time: intermediates of about this size.
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Activation:
    """The experts' gated activation of (gate, up) -> [n, I].

    limit None: silu(gate) * up (every family but GPT-OSS). Otherwise GPT-OSS's clamped form, in
    transformers' op order: gate clamped above at `limit`, up to [-limit, limit], then
    gate * sigmoid(alpha * gate) * (up + 1)."""

    limit: float | None = None
    alpha: float = 1.0

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        if self.limit is None:
            return F.silu(gate).mul_(up)
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


SWIGLU = Activation()


@dataclass(frozen=True)
class ExpertBiases:
    """Per-expert biases of the two projections (GPT-OSS): b13 [E, 2I] (gate, then up), b2 [E, H]."""

    b13: Tensor
    b2: Tensor

    def __getitem__(self, experts) -> "ExpertBiases":
        """The biases of some experts (an index or slice of dim 0), as `w13[experts]` takes their weights."""
        return ExpertBiases(self.b13[experts], self.b2[experts])


@dataclass(frozen=True)
class PermuteHandle:
    """What `unpermute` needs to undo `permute`. order: [T*K]; counts: [E]; num_tokens: T."""

    order: Tensor
    counts: Tensor
    num_tokens: int
    top_k: int

    @property
    def tokens(self) -> Tensor:
        """[T*K] the token of each sorted row."""
        return self.order // self.top_k if self.top_k > 1 else self.order


def sort_pairs(topk_ids: Tensor, num_experts: int) -> PermuteHandle:
    """topk_ids [T, K] -> the handle of the (token, expert) pairs sorted by expert (stable), without
    gathering any rows: `permute` gathers them into one tensor, the router into its messages."""
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat_ids, stable=True)  # [T*K]
    return PermuteHandle(order, torch.bincount(flat_ids, minlength=num_experts), *topk_ids.shape)


def permute(x: Tensor, topk_ids: Tensor, num_experts: int) -> tuple[Tensor, PermuteHandle]:
    """x [T, H], topk_ids [T, K] -> (x_sorted [T*K, H] grouped by expert, handle)."""
    handle = sort_pairs(topk_ids, num_experts)
    return x.index_select(0, handle.tokens), handle  # [T*K, H]


def unpermute(y_sorted: Tensor, handle: PermuteHandle, topk_weights: Tensor,
              scratch: Callable[[], Tensor] | None = None) -> Tensor:
    """y_sorted [T*K, H] (expert order), topk_weights [T, K] -> [T, H], summed in top-k order.
    `scratch()` gives memory of y_sorted's shape and dtype, asked for only where `combine` gathers."""
    order = handle.order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)  # [T*K] sorted row of each pair
    return combine(y_sorted, inverse.view(handle.num_tokens, handle.top_k), topk_weights, scratch)


def combine(rows: Tensor, index: Tensor, topk_weights: Tensor, scratch: Callable[[], Tensor] | None = None) -> Tensor:
    """rows [N, H], index [T, K] (the row of each pair), topk_weights [T, K] -> [T, H]:
    out[t] = sum over k, in order, of topk_weights[t, k] * rows[index[t, k]].

    float32 rows and weights: one `embedding_bag` (a token's K rows are its bag, in top-k order),
    which gathers, weights and sums each token in one pass over its rows instead of gathering
    all T*K rows into a second buffer and walking it twice more: 4-6x faster at OLMoE prefill
    sizes, where those passes cost more than the exchange they follow (bench/cluster_step.py).
    It multiplies and adds in one fused step, so its bits are not those of `_weighted_sum` (one
    rounding fewer), but they depend only on the rows and weights, never on the placement.
    Other dtypes keep transformers' products (see `_weighted_sum`): the rows are gathered in pair
    order, into `scratch()` (rows' shape and dtype) if given, weighted and summed in float32.
    """
    if rows.dtype == torch.float32 and topk_weights.dtype == torch.float32:  # torch.embedding_bag: F's checks cost as much
        num_tokens, top_k = index.shape
        return torch.embedding_bag(rows, index.reshape(-1), _range(num_tokens, top_k, index.device), False, 0, False,
                                   topk_weights.reshape(-1), False, None)[0]  # [T, H] (mode 0: sum)
    flat = index.reshape(-1)  # [T*K]
    y = torch.index_select(rows, 0, flat, out=scratch()[:flat.numel()]) if scratch else rows.index_select(0, flat)
    y = y.view(*index.shape, -1)  # [T, K, H] pair order
    scale = topk_weights.unsqueeze(-1)  # [T, K, 1]
    if torch.promote_types(y.dtype, scale.dtype) == y.dtype:  # the products in place: no second [T, K, H] buffer
        out = _sum_top_k(y.mul_(scale))
    else:
        out = _weighted_sum(y, topk_weights)
    return out if out.dtype == rows.dtype else out.to(rows.dtype)


def expert_ffn(x_sorted: Tensor, counts: list[int], w13: Tensor, w2: Tensor,
               biases: ExpertBiases | None = None, activation: Activation = SWIGLU) -> Tensor:
    """Grouped SwiGLU: rows of expert e are x_sorted[start_e : start_e + counts[e]].

    x_sorted [N, H]; counts: E ints summing to N; w13 [E, 2I, H]; w2 [E, H, I] -> [N, H].
    Experts with at most `_native_max_rows` rows go to the native CPU kernel (one call for all of
    them), the others to one pair of matmuls each; experts without rows cost nothing, so the same
    code is fast for decode (a few rows, a few experts) and prefill (thousands of rows).
    Experts with biases or another activation (GPT-OSS) go to the kernel where all experts would
    (float32, bf16 where `native.bf16_panels`), else are one pair of matmuls each, biases added.
    """
    starts = [0, *itertools.accumulate(counts)][:-1]
    most_native = _native_max_rows(w13) if native.supports(x_sorted, w13, w2) else 0
    if (biases is not None or activation != SWIGLU) and most_native < sys.maxsize:  # (all on the kernel, or none)
        return _expert_ffn_general(x_sorted, starts, counts, w13, w2, biases, activation)
    small = [(e, start, count) for e, (start, count) in enumerate(zip(starts, counts)) if 0 < count <= most_native]
    upcast = _needs_float32_matmul(w13.dtype, w13.device.type)
    if not small and not upcast and _has_grouped_mm(w13.device.type):  # the same per-expert matmuls, looped in C++
        offsets = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x_sorted.device)  # [E]
        gate, up = F.grouped_mm(x_sorted, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)  # [N, I] each
        return F.grouped_mm(F.silu(gate).mul_(up), w2.transpose(1, 2), offs=offsets)  # [N, H]
    out = torch.empty_like(x_sorted)
    if small:
        native.expert_ffn(x_sorted, torch.tensor(small), w13, w2, out, biases=biases, limit=activation.limit,
                          alpha=activation.alpha)
    buffer = None  # float32 copies of a few weight rows at a time, see _mm_float32
    for expert, (start, count) in enumerate(zip(starts, counts)):
        if count <= most_native:  # done above, or no rows
            continue
        rows = slice(start, start + count)
        if upcast and count > MAX_ROWS_LOW_PRECISION_MATMUL:
            if buffer is None:
                buffer = torch.empty(FLOAT32_BLOCK_BYTES // 4, dtype=torch.float32, device=x_sorted.device)
            _swiglu_float32(x_sorted[rows], w13[expert], w2[expert], out[rows], buffer)
        else:
            gate, up = torch.mm(x_sorted[rows], w13[expert].t()).chunk(2, dim=-1)  # [n, I] each
            torch.mm(F.silu(gate).mul_(up), w2[expert].t(), out=out[rows])  # [n, H]
    return out


def _expert_ffn_general(x_sorted: Tensor, starts: list[int], counts: list[int], w13: Tensor, w2: Tensor,
                        biases: ExpertBiases | None, activation: Activation) -> Tensor:
    """`expert_ffn` by torch matmuls: as transformers' experts compute, each projection's bias added to
    its matmul's rounded output. On CPU all experts at once (`F.grouped_mm`, the same per-expert matmuls
    without a Python loop over them), elsewhere an expert at a time."""
    if _has_grouped_mm(w13.device.type):
        offsets = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x_sorted.device)  # [E]
        gate_up = F.grouped_mm(x_sorted, w13.transpose(1, 2), offs=offsets)  # [N, 2I]
        rows = torch.tensor(counts, device=x_sorted.device)  # [E]: each expert's bias repeated over its rows
        if biases is not None:
            gate_up += biases.b13.repeat_interleave(rows, dim=0, output_size=x_sorted.shape[0])
        y = F.grouped_mm(activation(*gate_up.chunk(2, dim=-1)), w2.transpose(1, 2), offs=offsets)  # [N, H]
        return y if biases is None else y + biases.b2.repeat_interleave(rows, dim=0, output_size=x_sorted.shape[0])
    out = torch.empty_like(x_sorted)  # [N, H]
    for expert, (start, count) in enumerate(zip(starts, counts)):
        if not count:
            continue
        rows = slice(start, start + count)
        gate_up = F.linear(x_sorted[rows], w13[expert])  # [n, 2I]
        if biases is not None:
            gate_up += biases.b13[expert]
        y = F.linear(activation(*gate_up.chunk(2, dim=-1)), w2[expert])  # [n, H]
        out[rows] = y if biases is None else y + biases.b2[expert]
    return out


def _swiglu_float32(x: Tensor, w13: Tensor, w2: Tensor, out: Tensor, buffer: Tensor) -> None:
    """One expert with low-precision weights, multiplied in float32: x [n, H], w13 [2I, H], w2 [H, I] -> out [n, H].

    Same dtypes as the low-precision path (float32 accumulation, outputs and activation rounded to
    x.dtype), computed transposed ([2I, n], [I, n], [H, n]) so that each block of weight rows
    converted into `buffer` gives a contiguous block of output rows.
    """
    inter = w2.shape[-1]
    gate_up_t = _mm_float32(w13, x.float().t(), buffer).to(x.dtype)  # [2I, n]
    act_t = F.silu(gate_up_t[:inter]).mul_(gate_up_t[inter:])  # [I, n]
    out.copy_(_mm_float32(w2, act_t.float(), buffer).t())  # [n, H], rounded on copy


def _mm_float32(weight: Tensor, rhs: Tensor, buffer: Tensor) -> Tensor:
    """weight [R, C] (any dtype) @ rhs [C, n] (float32) -> float32 [R, n], converting the weight a
    block of rows at a time into `buffer`, small enough to stay in cache until the matmul reads it."""
    result = torch.empty(weight.shape[0], rhs.shape[1], dtype=torch.float32, device=rhs.device)  # [R, n]
    block_rows = max(1, buffer.numel() // weight.shape[1])
    for start in range(0, weight.shape[0], block_rows):
        block = weight[start:start + block_rows]  # [r, C]
        torch.mm(buffer[:block.numel()].view(block.shape).copy_(block), rhs, out=result[start:start + block_rows])
    return result


def fused_moe(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor,
              biases: ExpertBiases | None = None, activation: Activation = SWIGLU) -> Tensor:
    """All experts local: x [T, H], topk [T, K], w13 [E, 2I, H], w2 [E, H, I] -> [T, H].

    permute -> expert_ffn -> unpermute, with the same results to the bit, taken a chunk of
    consecutive experts at a time: each chunk gathers its rows and runs its experts, so a chunk's
    intermediates (about `CHUNK_BYTES`) stay in cache instead of every step streaming all T*K
    rows through memory for each of them. Small batches are one chunk. Float32 batches on CPU are
    one native call (`native.fused_moe`): the same steps and bits without ~0.2 ms of Python and
    small torch ops around the experts (most of a decode step's MoE time on small models), and
    its own chunking of the GEMMs' panels; so are bf16 ones where the kernel has bf16 GEMMs
    (`_native_block`), also without the gathered copy of x and the top-k sum's separate passes
    (OLMoE-like T=2048: ~25 of 107 ms).
    """
    num_tokens, top_k = topk_ids.shape
    if _native_block(x, topk_weights) and native.supports(x, w13, w2):  # one native call
        return native.fused_moe(x, topk_weights.contiguous(), topk_ids.contiguous(), w13, w2, biases=biases,
                                limit=activation.limit, alpha=activation.alpha)
    plain = biases is None and activation == SWIGLU
    if plain and num_tokens == 1:
        return _fused_moe_one_token(x, topk_weights, topk_ids, w13, w2)
    handle = sort_pairs(topk_ids, w13.shape[0])
    counts, tokens = handle.counts.tolist(), handle.tokens  # E; [T*K] token of each sorted row
    row_bytes = 4 * (w13.shape[1] + 2 * x.shape[1])  # float32 gate_up + input + output of one row
    chunks = list(_expert_chunks(counts, max(1, CHUNK_BYTES // row_bytes)))
    if len(chunks) == 1:  # a small batch: its rows are the sorted rows
        y_sorted = expert_ffn(x.index_select(0, tokens), counts, w13, w2, biases, activation)  # [T*K, H]
    else:
        y_sorted = torch.empty(num_tokens * top_k, x.shape[1], dtype=x.dtype, device=x.device)  # [T*K, H]
        for experts, rows in chunks:
            y_sorted[rows] = expert_ffn(x.index_select(0, tokens[rows]), counts[experts], w13[experts], w2[experts],
                                        biases[experts] if biases is not None else None, activation)
    return unpermute(y_sorted, handle, topk_weights)


def _expert_chunks(counts: list[int], max_rows: int):
    """(experts, sorted rows) slices of consecutive experts with about `max_rows` rows (at least one expert)."""
    first, start, end = 0, 0, 0
    for expert, count in enumerate(counts):
        if end > start and end + count - start > max_rows:
            yield slice(first, expert), slice(start, end)
            first, start = expert, end
        end += count
    if end > start:
        yield slice(first, len(counts)), slice(start, end)


def fused_moe_reference(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor,
                        biases: ExpertBiases | None = None, activation: Activation = SWIGLU) -> Tensor:
    """The einsum-free, loop-per-token reference the fast path is tested against."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gate_up = w13[e].float() @ x[t].float()  # [2I]
            if biases is not None:
                gate_up = gate_up + biases.b13[e].float()
            y = w2[e].float() @ activation(gate_up[:inter], gate_up[inter:])  # [H]
            if biases is not None:
                y = y + biases.b2[e].float()
            out[t] += float(topk_weights[t, k]) * y
    return out.to(x.dtype)


def _fused_moe_one_token(x: Tensor, topk_weights: Tensor, topk_ids: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """T = 1 (decode of one sequence): its K experts are distinct, one row each, so nothing to sort;
    the rows are combined as `unpermute` combines them."""
    top_k = topk_ids.shape[1]
    if native.supports(x, w13, w2):  # K groups of one row each, all of them x's only row
        groups = torch.tensor([(expert, k, 1) for k, expert in enumerate(topk_ids.tolist()[0])])  # [K, 3]
        y = native.expert_ffn(x, groups, w13, w2, torch.empty(top_k, x.shape[1], dtype=x.dtype), _range(top_k, 0, x.device))
    else:
        rows = []
        for expert in topk_ids.tolist()[0]:
            gate, up = F.linear(x, w13[expert]).chunk(2, dim=-1)  # [1, I] each
            rows.append(F.linear(F.silu(gate).mul_(up), w2[expert]))  # [1, H]
        y = torch.cat(rows)  # [K, H] top-k order
    return combine(y, _range(top_k, 1, x.device).view(1, top_k), topk_weights)


def _native_block(x: Tensor, topk_weights: Tensor) -> bool:
    """The block is one `native.fused_moe` call: float32, or bf16 where every bf16 expert runs on the kernel
    anyway (`native.bf16_panels`), with float32 or bf16 top-k weights."""
    if x.dtype == torch.float32:
        return topk_weights.dtype == torch.float32
    return x.dtype == torch.bfloat16 and topk_weights.dtype in (torch.float32, torch.bfloat16) and native.bf16_panels()


def _native_max_rows(w13: Tensor) -> int:
    """Rows up to which an expert runs on the native kernel: all of them in float32, and in bf16 where the
    kernel multiplies bf16 on the dot-product instruction (`native.bf16_panels`; see NATIVE_MAX_ROWS)."""
    if w13.dtype == torch.float32 or (w13.dtype == torch.bfloat16 and native.bf16_panels()):
        return sys.maxsize
    return NATIVE_MAX_ROWS if _needs_float32_matmul(w13.dtype, w13.device.type) else NATIVE_MAX_ROWS_BF16_MATMUL


@lru_cache(maxsize=256)
def _range(count: int, step: int, device: torch.device) -> Tensor:
    """[count] int64 0, step, 2*step, ... (a bag's offsets), or zeros: kept, decode steps ask for the same few."""
    return torch.arange(count, device=device) * step


def _weighted_sum(y: Tensor, topk_weights: Tensor) -> Tensor:
    """y [T, K, H], topk_weights [T, K] -> float32 [T, H] = sum over k, in order, of w[t, k] * y[t, k].

    Each product is taken in the promoted dtype of y and the weights, as transformers does: float32
    for Mixtral (float32 weights), the model dtype for Qwen-MoE / OLMoE (their routers round the
    weights to it, see `MoEBlock`); the sum is float32 either way, one addition at a time (no fused
    multiply-add).
    """
    return _sum_top_k(y * topk_weights.unsqueeze(-1))


def _sum_top_k(weighted: Tensor) -> Tensor:
    """weighted [T, K, H] -> float32 [T, H], summed over k in order."""
    if weighted.shape[1] == 1:
        return _float32(weighted.view(weighted.shape[0], -1))
    out = _float32(weighted[:, 0]) + weighted[:, 1]  # [T, H] float32
    for k in range(2, weighted.shape[1]):
        out += weighted[:, k]
    return out


def _float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


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
    """torch's grouped matmul takes every dtype on CPU, without alignment rules from torch 2.11 on;
    on CUDA only bf16, so we loop there."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return device_type == "cpu" and hasattr(F, "grouped_mm") and version >= (2, 11)
