"""rms_norm is bit-for-bit transformers' MixtralRMSNorm."""

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from moeray.kernels.norm import rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 96), (1, 128), (3, 4, 2, 48)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rms_norm_equals_transformers(dtype, shape, eps):
    gen = torch.Generator().manual_seed(hash((shape, eps)) % 2**31)
    hidden = shape[-1]
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    reference = MixtralRMSNorm(hidden, eps=eps).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(hidden, generator=gen))
        expected = reference(x)
    out = rms_norm(x, reference.weight.detach(), eps)
    assert out.dtype == expected.dtype == dtype
    assert torch.equal(out, expected)


def test_rms_norm_casts_before_weight_multiply():
    # In bf16 the order "cast to bf16, then multiply by the weight" gives other bits than
    # multiplying in float32 and casting once; this is the case equality above relies on.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    weight = torch.randn(256, generator=gen).to(torch.bfloat16)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    multiply_in_fp32 = (weight.float() * h).to(torch.bfloat16)
    assert not torch.equal(rms_norm(x, weight, 1e-6), multiply_in_fp32)
