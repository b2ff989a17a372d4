"""kernels.linear: F.linear's bits always; the native kernel only at shapes where it gives them."""

import pytest
import torch
import torch.nn.functional as F

from moeray.kernels import linear as linear_module
from moeray.kernels import native
from moeray.kernels.linear import linear


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 64, 65])
@pytest.mark.parametrize("inner,outputs", [(128, 256), (128, 8), (37, 100), (160, 64), (512, 128)])
def test_linear_gives_f_linear_bits(rows, inner, outputs):
    gen = torch.Generator().manual_seed(rows * inner + outputs)
    x, weight = torch.randn(rows, inner, generator=gen) * 3, torch.randn(outputs, inner, generator=gen)
    bias = torch.randn(outputs, generator=gen)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))


def test_each_shape_is_checked_once_and_a_disagreeing_kernel_is_never_used(monkeypatch):
    monkeypatch.setattr(linear_module, "_same_bits", {})
    calls = []
    real = native.logits
    monkeypatch.setattr(native, "logits", lambda x, w: calls.append(tuple(x.shape)) or real(x, w))
    x, weight = torch.randn(16, 128), torch.randn(256, 128)
    for _ in range(3):
        assert torch.equal(linear(x, weight), F.linear(x, weight))
    key = (16, 128, 256, torch.get_num_threads())
    assert list(linear_module._same_bits) == [key]  # one check for three calls
    assert calls.count((16, 128)) == 1 + 3 * linear_module._same_bits[key]  # the probe, then the calls it allows

    monkeypatch.setattr(native, "logits", lambda x, w: calls.append(tuple(x.shape)) or real(x, w) * (1 + 2 ** -20))
    calls.clear()
    x, weight = torch.randn(8, 96), torch.randn(64, 96)
    for _ in range(3):
        assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert linear_module._same_bits[(8, 96, 64, torch.get_num_threads())] is False and calls == [(8, 96)]  # the probe only
