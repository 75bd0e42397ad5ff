"""Quantizers: per-channel weights, mixed bit widths, static/dynamic activations, zero points,
straight-through gradients, and MSFP's premise on SiLU outputs."""
import numpy as np
import pytest
import torch

from exporter.formats import SIGNED_FP4, UNSIGNED_FP4, get_format, with_bits
from exporter.quantizers import ActQuantizer, WeightQuantizer, fake_quantize


def test_weight_quantizer_is_per_output_channel():
    wq = WeightQuantizer(3, "e2m1")
    with torch.no_grad():
        wq.scale.copy_(torch.tensor([0.5, 1.0, 2.0]))
    w = torch.randn(3, 7)
    expected = torch.stack([s * get_format("e2m1").quantize_torch(w[i] / s)
                            for i, s in enumerate([0.5, 1.0, 2.0])])
    torch.testing.assert_close(wq(w), expected, rtol=0, atol=0)


def test_weight_quantizer_mixed_bits_use_neighbour_formats():
    wq = WeightQuantizer(4, "e2m1")
    wq.bits.copy_(torch.tensor([3, 4, 5, 4], dtype=torch.int8))
    assert wq.mixed
    w = torch.randn(4, 16) * 3
    out = wq(w).detach()
    for row, bits in enumerate([3, 4, 5, 4]):
        fmt = with_bits(get_format("e2m1"), bits)
        np.testing.assert_array_equal(out[row].numpy(), fmt.quantize(w[row].numpy()))


def test_activation_quantizer_unsigned_zero_point():
    aq = ActQuantizer("ue2m2")
    with torch.no_grad():
        aq.scale.fill_(0.1)
        aq.zero_point.fill_(-0.278)
    x = torch.randn(2, 5, 8)
    u = ((x - torch.tensor(-0.278)) / torch.tensor(0.1)).numpy()
    expected = -0.278 + 0.1 * get_format("ue2m2").quantize(u)
    np.testing.assert_allclose(aq(x).detach().numpy(), expected, rtol=0, atol=1e-6)
    assert (aq(x) >= -0.278 - 1e-6).all()  # nothing below the zero point survives


def test_signed_format_ignores_zero_point():
    aq = ActQuantizer("ue2m2")
    with torch.no_grad():
        aq.zero_point.fill_(3.0)
    aq.set_format("e2m1")
    assert aq.zero_point.item() == 0.0
    x = torch.randn(4, 8)
    torch.testing.assert_close(aq(x), fake_quantize(x, get_format("e2m1"), aq.scale))


@pytest.mark.parametrize("fmt", ["e2m1", "ue3m1"])
def test_dynamic_per_token_scales_each_token_by_its_own_range(fmt):
    aq = ActQuantizer(fmt, mode="dynamic", channel_axis=-1)
    x = torch.randn(3, 4, 16) * torch.logspace(-2, 2, 4).view(1, 4, 1)
    y = aq(x)
    f = get_format(fmt)
    for t in range(4):
        tok = x[0, t]
        if f.signed:
            s, z = tok.abs().max() / f.max, 0.0
        else:
            z = tok.min()
            s = (tok.max() - z) / f.max
        ref = z + s * f.quantize_torch((tok - z) / s)
        torch.testing.assert_close(y[0, t], ref)
    # the largest magnitude of each token survives exactly (signed) -> no clipping
    if f.signed:
        torch.testing.assert_close(y.abs().amax(-1), x.abs().amax(-1))


def test_dynamic_mode_on_conv_uses_channel_axis_1():
    aq = ActQuantizer("e2m1", mode="dynamic", channel_axis=1)
    x = torch.randn(2, 8, 3, 3)
    x[:, :, 0, 0] *= 100
    y = aq(x)
    torch.testing.assert_close(y.abs().amax(1), x.abs().amax(1))


def test_straight_through_gradients_reach_input_and_scale():
    aq = ActQuantizer("e2m1")
    x = torch.randn(64, requires_grad=True)
    aq(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(64))
    assert aq.scale.grad is not None and aq.scale.grad.abs() > 0


def test_disabled_quantizers_pass_through():
    aq, wq = ActQuantizer("e2m1"), WeightQuantizer(2)
    aq.enabled = wq.enabled = False
    x = torch.randn(2, 3)
    assert aq(x) is x and wq(x) is x


def test_bad_activation_mode_is_rejected():
    with pytest.raises(ValueError, match="static"):
        ActQuantizer("e2m1", mode="sometimes")
    with pytest.raises(ValueError, match="nvfp4 activations are e2m1 along the last axis"):
        ActQuantizer("e1m2", mode="nvfp4")
    with pytest.raises(ValueError, match="nvfp4 activations are e2m1 along the last axis"):
        ActQuantizer("e2m1", mode="nvfp4", channel_axis=1)


@pytest.mark.parametrize("shape", [(6, 64), (2, 5, 48)])
def test_nvfp4_activations_equal_an_ml_dtypes_simulation_of_tensorrts_quantizer(shape):
    """mode="nvfp4": blocks of 16 along the last axis, block scale fp8_e4m3(amax / 6 / g) * g,
    values e2m1. The reference (graph_passes.native_fp4.nvfp4_dynamic_quantize) casts with
    ml_dtypes, not our encoder; zero blocks, saturation of the block scale at 448 and
    out-of-range values are included."""
    from graph_passes.native_fp4 import nvfp4_dynamic_quantize

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(shape[:-1] + (1,), generator=gen))
    x[..., 0, :16] = 0.0  # an all-zero block
    g = float(x.abs().max()) / (6 * 448) / 4  # the largest blocks saturate their FP8 scale
    q = ActQuantizer("e2m1", "nvfp4")
    with torch.no_grad():
        q.scale.fill_(g)
        got = q(x).numpy()
    want = nvfp4_dynamic_quantize(x.numpy(), g)
    np.testing.assert_array_equal(got, want)
    assert np.all(got[..., 0, :16] == 0)
    # and the block scales saturate at 448 g where the block max asks for more
    amax = np.abs(x.numpy()).reshape(-1, 16).max(1)
    assert (amax / 6 / g > 448).any()
    assert np.abs(got).reshape(-1, 16).max(1).max() <= 6 * 448 * g * (1 + 1e-6)


def _best_mse(x: np.ndarray, names, zero_point: float | None) -> tuple[float, str]:
    """Best MSE over formats and 200 clipping ranges (the search MSFP's initialisation does)."""
    best = (np.inf, "")
    lo = 0.0 if zero_point is None else zero_point
    span = np.abs(x).max() if zero_point is None else x.max() - zero_point
    for name in names:
        f = get_format(name)
        for frac in np.linspace(0.2, 1.0, 200):
            s = np.float32(span * frac / f.max)
            q = lo + s * f.quantize(((x - lo) / s).astype(np.float32))
            best = min(best, (float(np.mean((q - x) ** 2)), name))
    return best


def test_msfp_premise_unsigned_fp4_with_zero_point_beats_signed_on_silu():
    x = torch.nn.functional.silu(torch.randn(100_000, generator=torch.Generator().manual_seed(0))).numpy()
    signed_mse, signed_fmt = _best_mse(x, SIGNED_FP4, None)
    unsigned_mse, unsigned_fmt = _best_mse(x, UNSIGNED_FP4, float(x.min()))
    print(f"\nSiLU(N(0,1)) 4-bit MSE: best signed {signed_fmt} {signed_mse:.3e}, "
          f"best unsigned+zero point {unsigned_fmt} {unsigned_mse:.3e} "
          f"({signed_mse / unsigned_mse:.2f}x lower)")
    assert unsigned_mse < signed_mse
