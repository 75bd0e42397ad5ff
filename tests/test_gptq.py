"""GPTQ weight rounding (exporter.gptq): against an independent float64 reference, on the layers'
own grids, with the calibration's Hessians, and inside quantize_model (teacher, report, default)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporter.cli import UserError
from exporter.formats import get_format, with_bits
from exporter.gptq import AUTO_MAX_BYTES, MAX_FAN_IN, gptq_layer, gptq_round, hessian_bytes, row_grids
from exporter.layers import QuantConv2d, QuantLinear, quant_layers
from exporter.msfp import fake_quant
from exporter.quantize import QuantizeConfig
from quant_helpers import TEST_CALIB, tiny_fp


def _rows_quantize(w: torch.Tensor, scale: torch.Tensor, fmt, bits: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest of every row on its own grid, through the format's own quantizer."""
    out = torch.empty_like(w)
    for b in bits.unique().tolist():
        rows = bits == b
        out[rows] = with_bits(fmt, b).quantize_torch(w[rows] / scale[rows, None], ste=False) * scale[rows, None]
    return out


def _reference_gptq(w: np.ndarray, h: np.ndarray, quant, damp=0.01) -> np.ndarray:
    """The paper's algorithm written directly in float64: columns by decreasing H diagonal, the
    inverse Hessian of the remaining columns updated after each one (no Cholesky, no blocks)."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    perm = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    q = np.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = quant(w[:, i], perm[i])
        d = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i + 1:] -= np.outer(d, hinv[i, i + 1:])
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]  # drop column i (OBS update)
    return q[:, np.argsort(perm)]


def _problem(n_out=48, k=96, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5  # correlated inputs
    x = torch.randn(2 * n, k, generator=g) @ mix
    w = torch.randn(n_out, k, generator=g) * 0.05
    fmt = get_format("e2m1")
    bits = torch.full((n_out,), 4, dtype=torch.int8)
    bits[:8], bits[-8:] = 5, 3  # MPQ-DM widths: e2m2 and e2m0 rows
    scale = torch.stack([w[r].abs().max() / with_bits(fmt, int(b)).max for r, b in enumerate(bits)])
    return x[:n], x[n:], w, fmt, bits, scale


def test_gptq_matches_an_independent_float64_reference():
    x, _, w, fmt, bits, scale = _problem()
    h = x.T @ x
    ours, pre = gptq_round(w, h, scale, *row_grids(fmt, bits))

    def quant(col, _):
        t = torch.from_numpy(col).float()
        return (_rows_quantize(t[:, None], scale, fmt, bits)[:, 0]).double().numpy()

    ref = _reference_gptq(w.numpy(), h.double().numpy(), quant)
    codes_equal = np.mean(ours.numpy() == ref.astype(np.float32))
    # float32 blocks vs float64 rank-one updates: a rounding decision may flip at a near-tie
    assert codes_equal > 0.99, codes_equal
    err = lambda q: float(((x @ (torch.as_tensor(q).float() - w).T) ** 2).sum())  # noqa: E731
    assert err(ours) == pytest.approx(err(ref), rel=0.02)
    # every value lies on its row's grid, and is round-to-nearest of the compensated weights
    assert torch.equal(_rows_quantize(ours, scale, fmt, bits), ours)
    assert torch.equal(_rows_quantize(pre, scale, fmt, bits), ours)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """A diagonal Hessian gives no column anything to compensate: plain rounding, bit for bit."""
    _, _, w, fmt, bits, scale = _problem()
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5)
    q, pre = gptq_round(w, h, scale, *row_grids(fmt, bits))
    assert torch.equal(q, _rows_quantize(w, scale, fmt, bits)) and torch.equal(pre, w)


def test_gptq_lowers_the_output_error_on_held_out_inputs():
    x, x_test, w, fmt, bits, scale = _problem()
    q, _ = gptq_round(w, x.T @ x, scale, *row_grids(fmt, bits))
    rtn = _rows_quantize(w, scale, fmt, bits)
    err = lambda wq: float(((x_test @ (wq - w).T) ** 2).sum())  # noqa: E731
    assert err(q) < 0.7 * err(rtn), (err(q), err(rtn))


def test_gptq_layer_lands_on_the_layers_grid_with_smoothing_and_mixed_bits():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    layer = QuantConv2d(conv, w_fmt="e1m2")
    layer.smooth = torch.rand(8) + 0.5
    layer.w_quant.bits[:4] = 4 + 1
    layer.w_quant.bits[-4:] = 4 - 1
    ws = conv.weight.detach() * layer.smooth.view(1, -1, 1, 1)
    with torch.no_grad():
        layer.w_quant.scale.copy_(ws.abs().amax((1, 2, 3)) / 3.5)
    x = torch.randn(4, 8, 10, 10)
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 72)
    original, scale, bits = conv.weight.detach().clone(), layer.w_quant.scale.clone(), layer.w_quant.bits.clone()
    layer.a_quant.enabled = False

    def err():
        with torch.no_grad():
            return float(((layer(x) - F.conv2d(x, original, conv.bias, padding=1)) ** 2).sum())
    rtn = err()
    errors = gptq_layer(layer, cols.T @ cols, keep_float=True)
    gptq = err()
    assert gptq < rtn and errors["gptq"] < errors["rtn"]
    assert errors["rtn"] == pytest.approx(rtn, rel=1e-3) and errors["gptq"] == pytest.approx(gptq, rel=1e-3)
    assert torch.equal(layer.float_weight, original)  # the teacher's weight
    assert torch.equal(layer.w_quant.scale, scale) and torch.equal(layer.w_quant.bits, bits)
    # the new float weight is GPTQ's compensated weight: near the original, rounded to GPTQ's codes
    assert torch.equal(layer.quantized_weight(), layer.w_quant(layer.quantized_weight()))
    assert 0 < float((layer.weight - original).abs().max()) < float(original.abs().max())


def test_calibration_hessian_is_xtx_over_every_token_and_patch():
    from exporter.calibration import CalibConfig, collect_calibration
    from exporter.models import get_preset

    model = tiny_fp()
    names = ["down_blocks.0.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().double())) for n in names]
    cfg = CalibConfig(samples=2, steps=2, resolution=128, holdout=0, hessians=True)
    calib = collect_calibration(model, get_preset("sdxl-tiny"), cfg, capture=names)
    for h in hooks:
        h.remove()
    conv = model.get_submodule(names[0])
    ref = 0
    for x in seen[names[0]]:  # im2col by hand: every 3x3 window of the zero-padded input
        xp = F.pad(x, (1, 1, 1, 1))
        H, W = x.shape[2:]
        patches = torch.stack([xp[:, :, i:i + H, j:j + W] for i in range(3) for j in range(3)], 2)
        rows = patches.permute(0, 3, 4, 1, 2).reshape(-1, conv.in_channels * 9)  # (C, kh, kw) order
        ref = ref + rows.T @ rows
    torch.testing.assert_close(calib.layers[names[0]].h.double(), ref, rtol=1e-4, atol=1e-3)
    ref = sum(x.reshape(-1, x.shape[-1]).T @ x.reshape(-1, x.shape[-1]) for x in seen[names[1]])
    torch.testing.assert_close(calib.layers[names[1]].h.double(), ref, rtol=1e-4, atol=1e-3)
    without = collect_calibration(model, get_preset("sdxl-tiny"), CalibConfig(samples=2, steps=2, resolution=128,
                                                                                holdout=0), capture=names)
    assert all(c.h is None for c in without.layers.values())


def test_gptq_is_automatic_where_its_hessians_are_small():
    from exporter.models import get_preset
    from exporter.quantize import select_layers

    def hbytes(name):
        p = get_preset(name)
        m = p.build_empty()
        names, _ = select_layers(m, None, QuantizeConfig().exclude_regex(p))
        return hessian_bytes(m.get_submodule(n).weight[0].numel() for n in names)

    assert hbytes("sdxl-tiny") < 100e6 < AUTO_MAX_BYTES  # 74 MB: on by default
    assert hbytes("sdxl") > AUTO_MAX_BYTES  # about 6 GB: off unless asked
    assert hessian_bytes([MAX_FAN_IN + 1]) == 0  # wider layers keep round-to-nearest
    with pytest.raises(UserError, match="gptq"):
        QuantizeConfig(gptq="yes").validate()


def test_quantize_model_applies_gptq_and_fine_tunes_against_the_original_weights():
    from exporter.finetune import float_model
    from exporter.models import get_preset
    from exporter.models.presets import run_unet
    from exporter.quantize import quantize_model

    fp = tiny_fp()
    kw = dict(TEST_CALIB, include=r"^up_blocks\.1\.resnets\.0\.")
    model, report = quantize_model("sdxl-tiny", model=copy.deepcopy(fp), finetune_steps=2, **kw)
    assert report.config["gptq"] is True  # automatic on sdxl-tiny
    assert report.gptq["layers"] == len(report.layers) == 4 and report.gptq["round_to_nearest"] == []
    assert 0 < report.gptq["error_ratio"] < 1
    layers = dict(quant_layers(model))
    assert all(m.float_weight is None for m in layers.values())  # freed after fine-tuning
    changed = [n for n, m in layers.items() if not torch.equal(m.weight, fp.get_submodule(n).weight)]
    assert changed == list(layers)  # every layer's float weight is now GPTQ's compensated weight
    # the teacher during fine-tuning runs on float_weight, and the rounded weights come back after
    plain, _ = quantize_model("sdxl-tiny", model=copy.deepcopy(fp), finetune_steps=0, gptq=False, **kw)
    feeds = get_preset("sdxl-tiny").example_inputs(batch=1)
    with torch.no_grad(), float_model(plain):
        teacher = run_unet(plain, feeds)
    for _, m in quant_layers(plain):
        m.float_weight = m.weight.detach().clone()
        m.weight.data.add_(0.1)  # as if rounded: the teacher must not see it
    rounded = {n: m.weight.detach().clone() for n, m in quant_layers(plain)}
    with torch.no_grad(), float_model(plain):
        assert torch.equal(run_unet(plain, feeds), teacher)
    assert all(torch.equal(m.weight, rounded[n]) for n, m in quant_layers(plain))
    off, report_off = quantize_model("sdxl-tiny", model=copy.deepcopy(fp), finetune_steps=0, gptq=False, **kw)
    assert report_off.gptq is None
    assert all(torch.equal(m.weight, fp.get_submodule(n).weight) for n, m in quant_layers(off))
