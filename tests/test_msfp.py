"""MSFP search: fast grid rounding, AAL rule, mixup-sign choice, consistency with the quantized layers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporter.calibration import conv_rows
from exporter.formats import SIGNED_FP4, UNSIGNED_FP4, get_format, with_bits
from exporter.layers import QuantConv2d, QuantLinear
from exporter.msfp import (SIGNED_FP8, UNSIGNED_FP8, SearchSpace, apply_choice, fake_quant, grid_round, is_aal,
                           search_layer)
from exporter.quantizers import fake_quantize

SEARCH_FORMATS = sorted({n for base in SIGNED_FP4 + UNSIGNED_FP4 for n in
                         (base, with_bits(get_format(base), 3).name, with_bits(get_format(base), 5).name)}
                        | set(SIGNED_FP8 + UNSIGNED_FP8))


@pytest.mark.parametrize("name", SEARCH_FORMATS)
def test_grid_round_equals_the_format_quantizer(name):
    fmt = get_format(name)
    g = torch.from_numpy(fmt.grid())
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000) * fmt.max / 3, torch.randn(2000) * 1e-3, g, (g[1:] + g[:-1]) / 2,
                   -(g[1:] + g[:-1]) / 2, torch.tensor([0.0, -0.0, 1e30, -1e30, fmt.max * 1.01, 3 * fmt.max])])
    assert torch.equal(grid_round(x, fmt), fmt.quantize_torch(x, ste=False))


@pytest.mark.parametrize("name", ["e2m1", "ue2m2", "e4m3"])
def test_fake_quant_equals_fake_quantize(name):
    fmt = get_format(name)
    x = torch.randn(64, 33) * 3
    scale, zero = torch.rand(64, 1) + 0.1, torch.tensor(-0.3)
    assert torch.equal(fake_quant(x, fmt, scale, zero), fake_quantize(x, fmt, scale, zero))


@pytest.mark.parametrize("scale", [0.05, 1.0, 30.0])
def test_aal_rule_catches_silu_and_gelu_outputs_at_any_scale(scale):
    torch.manual_seed(0)
    for act in (F.silu, F.gelu):
        y = act(torch.randn(4096) * scale + 0.5)
        assert is_aal(float(y.min()), float(y.max())), (act, scale)
    x = torch.randn(4096) * scale
    assert not is_aal(float(x.min()), float(x.max())) or scale < 0.1  # tiny symmetric ranges may pass


def _linear_problem(seed=0, n=512, k=64, n_out=48, silu=True, outliers=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * 2
    if outliers:  # a few input channels 20x larger, a few weight rows heavy-tailed
        x[:, :3] *= 20
    x = F.silu(x) if silu else x
    w = torch.randn(n_out, k, generator=g) * 0.1
    if outliers:
        w[:6] *= torch.distributions.StudentT(2.0).sample((6, k)).abs().clamp(max=30)
    return x, w


def _search(x, w, **space):
    return search_layer(x, w, None, x.amin(0), x.amax(0), 1, SearchSpace(**space))


def test_mixup_sign_picks_unsigned_for_silu_inputs_and_beats_signed_only():
    x, w = _linear_problem(silu=True)
    mixup = _search(x, w, mixed_precision=False)
    signed = _search(x, w, mixed_precision=False, a_unsigned=())
    assert mixup.aal and mixup.a_format.startswith("u")
    assert signed.a_format in SIGNED_FP4
    assert mixup.sqnr_db > signed.sqnr_db + 1.0


def _layer_sqnr(layer, x_rows, y_fp):
    with torch.no_grad():
        yq = layer(x_rows)
    return 10 * math.log10(float(y_fp.pow(2).sum()) / float((yq - y_fp).pow(2).sum()))


@pytest.mark.parametrize("a_mode", ["static", "dynamic"])
def test_search_error_is_the_quantized_linear_layers_error(a_mode):
    x, w = _linear_problem(outliers=True)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(w)
    choice = search_layer(x, w, lin.bias.detach(), x.amin(0), x.amax(0), 1, SearchSpace(a_mode=a_mode))
    assert choice.smooth is not None  # the outlier input channels make smoothing pay
    q = QuantLinear(lin)
    apply_choice(q, choice)
    assert q.a_quant.mode == a_mode and torch.equal(q.w_quant.bits, choice.w_bits)
    assert _layer_sqnr(q, x, lin(x).detach()) == pytest.approx(choice.sqnr_db, abs=1e-3)


def test_search_error_is_the_quantized_conv_layers_error():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = F.silu(torch.randn(2, 8, 10, 10) * 2)
    rows = conv_rows(x, conv)
    w = conv.weight.detach().reshape(16, -1)
    choice = search_layer(rows, w, conv.bias.detach(), x.amin((0, 2, 3)), x.amax((0, 2, 3)), 9,
                          SearchSpace(a_mode="dynamic"))  # convs fall back to static
    q = QuantConv2d(conv)
    apply_choice(q, choice)
    assert q.a_quant.mode == "static"
    with torch.no_grad():
        y, yq = conv(x)[:, :, 1:-1, 1:-1], q(x)[:, :, 1:-1, 1:-1]  # the interior patches
    sqnr = 10 * math.log10(float(y.pow(2).sum()) / float((yq - y).pow(2).sum()))
    assert sqnr == pytest.approx(choice.sqnr_db, abs=1e-3)


def test_w4a16_leaves_activations_unquantized():
    x, w = _linear_problem()
    choice = _search(x, w, a_mode=None, a_signed=(), a_unsigned=())
    q = QuantLinear(nn.Linear(64, 48))
    apply_choice(q, choice)
    assert choice.a_format is None and not q.a_quant.enabled


def test_pruned_search_mostly_agrees_with_the_exhaustive_one():
    from exporter.calibration import CalibConfig, collect_calibration
    from exporter.models import get_preset
    from exporter.quantize import search_layers, select_layers
    from quant_helpers import tiny_fp

    model = tiny_fp()
    names, _ = select_layers(model, r"^(down_blocks\.1|mid_block)", None)
    calib = collect_calibration(model, get_preset("sdxl-tiny"), CalibConfig(samples=2, steps=3, max_tokens=128),
                                capture=names)
    space = SearchSpace(mixed_precision=False)
    pruned = search_layers(model, calib, names, space, keep_captures=True)
    full = search_layers(model, calib, names, SearchSpace(mixed_precision=False, exhaustive=True))
    same = [pruned[n].w_format == full[n].w_format and pruned[n].a_format == full[n].a_format for n in names]
    assert sum(same) / len(same) >= 0.7
    # and the pruned choice is never far from the exhaustive optimum
    assert all(pruned[n].sqnr_db > full[n].sqnr_db - 2.0 for n in names)


def test_mixed_precision_beats_uniform_bits_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    w = (torch.rand(48, 64, generator=g) - 0.5) * 0.2  # light-tailed rows (kurtosis 1.8)
    torch.manual_seed(0)
    w[:8] = torch.distributions.StudentT(3.0).sample((8, 64)) * 0.3  # 8 outlier-heavy rows
    space = dict(a_mode=None, a_signed=(), a_unsigned=())
    mixed, uniform = _search(x, w, **space), _search(x, w, mixed_precision=False, **space)
    same_smoothing = _search(x, w, mp_step=1 << 30, **space)  # no count k fits: uniform bits, (mixed)'s smoothing
    assert mixed.mp_k > 0 and same_smoothing.mp_k == 0
    assert (mixed.smooth is None) == (same_smoothing.smooth is None) and mixed.w_format == same_smoothing.w_format
    assert int((mixed.w_bits == 5).sum()) == int((mixed.w_bits == 3).sum()) == mixed.mp_k
    assert float(mixed.w_bits.float().mean()) == 4.0
    assert bool((mixed.w_bits[:8] == 5).all())  # the heavy-tailed rows rank first by kurtosis
    assert mixed.sqnr_db > uniform.sqnr_db + 1.0
    # the bits alone, on rows the search never saw (in-sample, k > 0 is only chosen where it helps)
    x_new = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    lin = nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)

    def held_out(choice):
        q = QuantLinear(lin)
        apply_choice(q, choice)
        return _layer_sqnr(q, x_new, lin(x_new).detach())

    assert held_out(mixed) > held_out(same_smoothing) + 1.0
