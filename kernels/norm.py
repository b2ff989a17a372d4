"""RMSNorm, bit-for-bit the same as transformers' MixtralRMSNorm (and its Llama/Qwen twins).

The statistics are taken in float32 whatever the activation dtype, the normalised value is
cast back to the input dtype *before* the weight multiply. The order matters in bf16: doing
the multiply in float32 and casting once at the end is more accurate but gives different
bits, and correctness here is measured as equality with transformers.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., H] (fp32 or bf16), weight [H] -> [..., H].

    The result dtype follows torch promotion of `weight * x.dtype`, exactly like
    transformers: bf16 activations with a bf16 weight stay bf16; an fp32 weight promotes.
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # Both casts are no-ops and torch's rms_norm is this formula (pow, mean, + eps, rsqrt, two
        # products), the same bits in one call instead of six; test_norm holds it to that.
        return F.rms_norm(x, weight.shape, weight, eps)
    input_dtype = x.dtype
    h = x.to(torch.float32)  # [..., H]
    variance = h.pow(2).mean(-1, keepdim=True)  # [..., 1]
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)
