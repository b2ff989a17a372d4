"""`F.linear` with torch's own bits, on the native kernel for the shapes where that kernel gives them.

Why: a decode step's projections (q/k/v, o, a dense MLP) multiply a few rows by a small weight.
There MKL's sgemm costs more in set-up than in arithmetic, and the native kernel (`native.logits`)
does the same work 1.2-1.6x faster (3-4% of a batch-16 decode step of the built-in model).

Why only where the bits agree: layer outputs feed every later layer, and on the test checkpoints
(random weights scaled up) a different rounding in a projection grows past the 1e-4 bound on logits
against transformers. The native kernel sums each output as one chain of fused multiply-adds over
the inner dimension, in order. MKL's GEMM does the same for short inner dimensions. On the 2-core
AMD VM these were measured on, that holds for K <= 160 with at least 4 rows and 64 outputs; longer
sums are split into blocks, and fewer rows or outputs go to other kernels. Where the two agree,
taking the native kernel changes nothing but the time. Which shapes agree depends on MKL's choices,
so it can differ by CPU and version. Each (rows, inner, outputs, threads) is therefore checked the
first time it is asked for, on a random probe, and the answer is kept.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from moeray.kernels import native

# Rows where the kernel is faster than MKL (2-core AVX2 VM, K=128: 1.2-1.6x at 4-64 rows) and inner
# dimensions short enough that MKL may sum them in one chain (it splits longer ones: never the same bits).
MIN_ROWS, MAX_ROWS = 4, 64
MAX_INNER = 256

_same_bits: dict[tuple[int, int, int, int], bool] = {}  # (rows, inner, outputs, threads) -> agrees


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N], bit for bit `F.linear`."""
    if (bias is None and x.dim() == 2 and MIN_ROWS <= x.shape[0] <= MAX_ROWS and weight.shape[1] <= MAX_INNER
            and x.dtype == torch.float32 and native.supports(x, weight)):
        key = (x.shape[0], weight.shape[1], weight.shape[0], torch.get_num_threads())
        same = _same_bits.get(key)
        if same is None:
            same = _same_bits[key] = _agrees(*key[:3])
        if same:
            return native.logits(x, weight)
    return F.linear(x, weight, bias)


def _agrees(rows: int, inner: int, outputs: int) -> bool:
    """Whether MKL and the native kernel give the same bits at this shape, on random values: where
    the order of additions differs, random operands tell it apart."""
    gen = torch.Generator().manual_seed(rows * 1_000_003 + inner * 1009 + outputs)
    x = torch.randn(rows, inner, generator=gen)
    weight = torch.randn(outputs, inner, generator=gen)
    return torch.equal(F.linear(x, weight), native.logits(x, weight))
