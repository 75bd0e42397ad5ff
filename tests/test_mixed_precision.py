"""MPQ-DM pieces: smoothing factors (and their exactness in the layers), kurtosis, bit allocation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporter.layers import QuantConv2d, QuantLinear, set_quant_enabled
from exporter.mixed_precision import allocate_bits, kurtosis, smoothing_factors


def test_smoothing_balances_activation_and_weight_ranges():
    x_absmax = torch.tensor([100.0, 1.0, 4.0, 0.0])
    w_absmax = torch.tensor([1.0, 1.0, 0.25, 3.0])
    s = smoothing_factors(x_absmax, w_absmax)
    torch.testing.assert_close(s[:3], torch.tensor([10.0, 1.0, 4.0]))
    assert s[3] == 1.0  # a dead channel is left alone
    torch.testing.assert_close(x_absmax[:3] / s[:3], w_absmax[:3] * s[:3])  # MPQ-DM: both sides meet


def test_kurtosis_flags_outlier_rows():
    torch.manual_seed(0)
    w = torch.randn(4, 20000)
    w[1, :10] = 30.0
    k = kurtosis(w)
    assert abs(float(k[0]) - 3.0) < 0.2 and float(k[1]) > 10


def test_bit_allocation_keeps_the_average_and_takes_the_best_count():
    kurt = torch.arange(32, dtype=torch.float32).flip(0)  # channel 0 is the most kurtotic
    mid = torch.ones(32)
    high = torch.where(torch.arange(32) < 8, torch.full((32,), 0.1), torch.full((32,), 0.9))
    low = torch.full((32,), 1.5)
    bits, k, total = allocate_bits(low, mid, high, kurt, 4, step=8)
    assert k == 8 and total == pytest.approx(32 - 8 * 0.9 + 8 * 0.5)
    assert bits[:8].tolist() == [5] * 8 and bits[-8:].tolist() == [3] * 8 and float(bits.float().mean()) == 4
    bits, k, _ = allocate_bits(torch.full((32,), 9.0), mid, high, kurt, 4, step=8)
    assert k == 0 and bool((bits == 4).all())  # N-1 too costly: uniform bits


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_smoothing_in_the_layer_is_exact_and_invisible_when_absent(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x, c = nn.Linear(16, 8), torch.randn(3, 5, 16), 16
        make = QuantLinear
    else:
        base, x, c = nn.Conv2d(6, 4, 3, padding=1), torch.randn(2, 6, 7, 7), 6
        make = QuantConv2d
    q = make(base)
    with torch.no_grad():
        q.w_quant.scale.copy_(q.weight.reshape(q.weight.shape[0], -1).abs().amax(1) / 6)
        q.a_quant.scale.fill_(0.3)
    y0 = q(x)
    q.smooth = torch.ones(c)
    assert torch.equal(q(x), y0)  # all-ones smoothing changes nothing, bit for bit
    q.smooth = torch.rand(c) * 3 + 0.2
    set_quant_enabled(q, False, False)
    torch.testing.assert_close(q(x), base(x), rtol=1e-5, atol=1e-5)  # X/s . (W s)^T = X W^T
    set_quant_enabled(q, True, True)
    shape = (1, -1) + (1,) * (x.dim() - 2) if kind == "conv" else (-1,)
    xs = x / q.smooth.view(shape)
    ws = q.weight * q.smooth.view((1, -1) + (1,) * (q.weight.dim() - 2))
    ref = (F.linear(q.a_quant(xs), q.w_quant(ws), q.bias) if kind == "linear"
           else F.conv2d(q.a_quant(xs), q.w_quant(ws), q.bias, padding=1))
    assert torch.equal(q(x), ref)
