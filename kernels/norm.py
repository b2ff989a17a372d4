"""RMSNorm, bit-for-bit the same as transformers' MixtralRMSNorm (and its Llama/Qwen twins).

The statistics are taken in float32 whatever the activation dtype, the normalised value is
cast back to the input dtype *before* the weight multiply. The order matters in bf16: doing
the multiply in float32 and casting once at the end is more accurate but gives different
bits, and correctness here is measured as equality with transformers. GPT-OSS's norm is that
other order (`round_once=True`); in float32 the two are the same.

float32 on the CPU takes the native kernel (`native.rms_norm`): torch runs the formula as six
small ops, ~20 us for a decode step's [16, 128] (~40 us inside a step, where the caches are cold:
~10% of a batch-16 decode step of the built-in model), the kernel one pass in ~2 us. It adds the
squares in torch's own order (its cascade sum over vectors of 8 or 16 lanes), so the bits are the
same; since that order belongs to torch's build and CPU, the width is found by trying both
(`lanes`: torch's CPU capability does not tell it, an AVX-512 machine was seen summing in 8s), and
each hidden size is checked against `F.rms_norm` on random rows the first time it is asked for,
keeping `F.rms_norm` if they differ.
"""

import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from moeray.kernels import native

logger = logging.getLogger(__name__)

_same_bits: dict[int, bool] = {}  # hidden size -> the kernel gives F.rms_norm's bits


def rms_norm(x: Tensor, weight: Tensor, eps: float, round_once: bool = False) -> Tensor:
    """x [..., H] (fp32 or bf16), weight [H] -> [..., H].

    The result dtype follows torch promotion of `weight * x.dtype`, exactly like
    transformers: bf16 activations with a bf16 weight stay bf16; an fp32 weight promotes.
    round_once: multiply by the weight in float32 and round the product to x's dtype (GPT-OSS).
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # Both casts are no-ops and torch's rms_norm is this formula (pow, mean, + eps, rsqrt, two
        # products), the same bits in one call instead of six; test_norm holds it to that.
        if _native(x, weight):
            return native.rms_norm(x, weight, eps, lanes())[1]
        return F.rms_norm(x, weight.shape, weight, eps)
    input_dtype = x.dtype
    h = x.to(torch.float32)  # [..., H]
    variance = h.pow(2).mean(-1, keepdim=True)  # [..., 1]
    h = h * torch.rsqrt(variance + eps)
    return (weight * h).to(input_dtype) if round_once else weight * h.to(input_dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, round_once: bool = False) -> tuple[Tensor, Tensor]:
    """(x + residual, rms_norm(x + residual)): a residual connection and the norm after it, in one
    native pass for float32 on the CPU (the same bits: the sum is one rounding either way)."""
    if residual.shape == x.shape and _native(x, weight, residual):
        return native.rms_norm(x, weight, eps, lanes(), residual)
    total = x + residual
    return total, rms_norm(total, weight, eps, round_once)


def _native(x: Tensor, *alike: Tensor) -> bool:
    """float32 x (and `alike`) the kernel takes, at a hidden size where it gives F.rms_norm's bits."""
    hidden = x.shape[-1]
    if not (x.dtype == torch.float32 and native.supports(x, *alike) and lanes() and hidden >= lanes()):
        return False
    same = _same_bits.get(hidden)
    if same is None:
        same = _same_bits[hidden] = _agrees(hidden)
    return same


@cache
def lanes() -> int | None:
    """The vector width (floats) at which the kernel sums the squares in torch's order here: 8 or 16,
    whichever gives F.rms_norm's bits on rows of a few sizes; None (never native) if neither does."""
    for width in (8, 16):
        if all(_agrees(hidden, width) for hidden in (96, 1024, 4096)):
            return width
    logger.info("native RMSNorm gives torch's bits at no vector width here: F.rms_norm kept")
    return None


def _agrees(hidden: int, width: int | None = None) -> bool:
    """Whether the kernel gives F.rms_norm's bits at this hidden size, on random rows of different
    magnitudes (one row alone too: a long lone row is where torch could split its sum; and many, as
    an order that differs changes the bits of only some rows)."""
    gen = torch.Generator().manual_seed(hidden)
    weight = torch.randn(hidden, generator=gen)
    for rows in (1, 5, 64):
        x = torch.randn(rows, hidden, generator=gen) * torch.logspace(-3, 2, rows).unsqueeze(-1)
        if not torch.equal(native.rms_norm(x, weight, 1e-6, width or lanes())[1], F.rms_norm(x, (hidden,), weight, 1e-6)):
            if width is None:
                logger.info("native RMSNorm does not give torch's bits at hidden size %d here: F.rms_norm kept", hidden)
            return False
    return True
