"""Quantized layers: y = Q_a(x) Q_w(W + s B A)^T, LoRA / TALoRA slots, the swap helper."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporter.formats import get_format
from exporter.layers import QuantConv2d, QuantLinear, quant_layers, set_quant_enabled, swap_quant_layers
from exporter.lora import LoRA, TALoRA, AdapterSelection, TimestepRouter
from exporter.quantizers import fake_quantize


def _calibrated_linear(lora=None):
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(16, 8), w_fmt="e2m1", a_fmt="ue2m2")
    with torch.no_grad():
        layer.w_quant.scale.copy_(layer.weight.abs().amax(1) / 6)
        layer.a_quant.scale.fill_(0.05)
        layer.a_quant.zero_point.fill_(-0.27)
    if lora is not None:
        layer.add_lora(lora)
    return layer


def test_quant_linear_is_quantized_activation_times_quantized_weight():
    layer = _calibrated_linear()
    x = F.silu(torch.randn(2, 5, 16))
    xq = fake_quantize(x, get_format("ue2m2"), torch.tensor(0.05), torch.tensor(-0.27))
    wq = fake_quantize(layer.weight, get_format("e2m1"), layer.w_quant.scale.view(-1, 1))
    torch.testing.assert_close(layer(x), F.linear(xq, wq, layer.bias), rtol=0, atol=0)


def test_lora_joins_the_weight_before_quantization():
    lora = LoRA(16, 8, rank=2, scale=0.5)
    with torch.no_grad():
        lora.B.normal_()
    layer = _calibrated_linear(lora)
    w_eff = layer.weight + 0.5 * lora.B @ lora.A
    wq = fake_quantize(w_eff, get_format("e2m1"), layer.w_quant.scale.view(-1, 1))
    torch.testing.assert_close(layer.quantized_weight(), wq, rtol=0, atol=0)
    # and it differs from quantizing W alone, so the test would notice a LoRA dropped or added after
    assert not torch.equal(wq, layer.w_quant(layer.weight))


def test_talora_router_picks_one_adapter_per_timestep_and_gradients_flow():
    sel = AdapterSelection(3)
    talora = TALoRA(16, 8, rank=2, selection=sel)
    with torch.no_grad():
        talora.B.normal_()
    layer = _calibrated_linear(talora)
    router = TimestepRouter(embed_dim=4, selection=sel)
    temb = torch.randn(2, 4)
    weights = router(temb)
    k = sel.index
    assert weights.detach().tolist() == F.one_hot(torch.tensor(k), 3).float().tolist()
    torch.testing.assert_close(talora.delta(), talora.B[k] @ talora.A[k])
    layer(torch.randn(1, 16)).sum().backward()
    assert router.net[0].weight.grad is not None and router.net[0].weight.grad.abs().sum() > 0


def test_quant_conv2d_matches_functional_conv():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    q = QuantConv2d(conv, w_fmt="e1m2", a_fmt="e2m1", a_mode="dynamic")
    x = torch.randn(1, 4, 8, 8)
    xq = q.a_quant(x)
    wq = fake_quantize(conv.weight, get_format("e1m2"), q.w_quant.scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(q(x), F.conv2d(xq, wq, conv.bias, stride=2, padding=1))
    lora = LoRA(4 * 9, 6, rank=2)
    q.add_lora(lora)
    assert q.effective_weight().shape == conv.weight.shape


def test_lora_that_does_not_fit_is_rejected():
    layer = _calibrated_linear()
    with pytest.raises(ValueError, match="do not fit"):
        layer.add_lora(LoRA(15, 8, rank=2))
    with pytest.raises(ValueError, match="rank"):
        LoRA(16, 8, rank=0)
    with pytest.raises(ValueError, match="adapter count"):
        AdapterSelection(0)


def test_swap_quant_layers_follows_the_name_filter():
    model = nn.Sequential()
    model.add_module("conv_in", nn.Conv2d(3, 4, 3))
    model.add_module("block", nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 4)))
    model.add_module("conv_out", nn.Conv2d(4, 3, 3))
    swapped = swap_quant_layers(model, exclude=r"^conv_(in|out)$")
    assert swapped == ["block.0", "block.2"]
    assert isinstance(model.block[0], QuantLinear) and isinstance(model.conv_in, nn.Conv2d)
    assert [n for n, _ in quant_layers(model)] == swapped
    # weights are the original Parameters, not copies
    set_quant_enabled(model, weights=False, activations=False)
    x = torch.randn(2, 4)
    expected = F.linear(F.silu(F.linear(x, model.block[0].weight, model.block[0].bias)),
                        model.block[2].weight, model.block[2].bias)
    torch.testing.assert_close(model.block(x), expected)
