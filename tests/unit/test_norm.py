"""rms_norm is bit-for-bit transformers' MixtralRMSNorm."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from moeray.kernels import native, norm
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


@pytest.mark.parametrize("hidden", [8, 37, 200, 513, 4096, 40000])
@pytest.mark.parametrize("rows", [1, 16])
def test_float32_rms_norm_has_torch_bits_at_any_size(hidden, rows):
    """float32 takes the native kernel where it reproduces torch's order of additions (tails of
    vectors and of partial sums, the cascade's levels past 2^16 squares): bitwise F.rms_norm."""
    gen = torch.Generator().manual_seed(hidden * rows)
    x = torch.randn(rows, hidden, generator=gen) * torch.logspace(-2, 2, rows).unsqueeze(-1)
    weight = torch.randn(hidden, generator=gen)
    assert torch.equal(rms_norm(x, weight, 1e-5), F.rms_norm(x, (hidden,), weight, 1e-5))


def test_native_rms_norm_is_taken_only_where_it_agrees(monkeypatch):
    """Each hidden size is checked once; a kernel that disagrees (here: one ulp off) is never used."""
    calls = []
    real = native.rms_norm
    monkeypatch.setattr(norm, "_same_bits", {})
    monkeypatch.setattr(native, "rms_norm", lambda *args: calls.append(args[0].shape) or real(*args))
    x, weight = torch.randn(4, 64), torch.randn(64)
    for _ in range(3):
        assert torch.equal(rms_norm(x, weight, 1e-6), F.rms_norm(x, (64,), weight, 1e-6))
    assert norm._same_bits == {64: True} and calls.count((4, 64)) == 3  # checked once (on its own rows), used 3 times

    monkeypatch.setattr(native, "rms_norm", lambda *args: calls.append(args[0].shape) or (args[0], torch.nextafter(real(*args)[1], torch.tensor(1e9))))
    calls.clear()
    x, weight = torch.randn(4, 72), torch.randn(72)
    for _ in range(3):
        assert torch.equal(rms_norm(x, weight, 1e-6), F.rms_norm(x, (72,), weight, 1e-6))
    assert norm._same_bits[72] is False and (4, 72) not in calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_is_the_sum_and_its_norm(dtype):
    gen = torch.Generator().manual_seed(13)
    x, residual = (torch.randn(9, 96, generator=gen) * 4).to(dtype), torch.randn(9, 96, generator=gen).to(dtype)
    weight = torch.randn(96, generator=gen).to(dtype)
    total, normed = norm.add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, x + residual) and torch.equal(normed, rms_norm(x + residual, weight, 1e-5))
