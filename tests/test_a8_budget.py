"""QuantizeConfig.a8_budget: 8-bit e4m3 activations for the layers whose 4-bit ones cost the most
per MAC (exporter.quantize.activation_costs / a8_layers), and the fp8 target keeping them FP8."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.cli import UserError
from exporter.layers import quant_layers
from exporter.quantize import A8_COST_SAMPLES, A8_FORMATS, QuantizeConfig, a8_layers
from quant_helpers import TEST_CALIB, tiny_fp


def test_a8_layers_takes_the_best_cost_per_mac_that_fit_the_budget():
    costs = {"a": 10.0, "b": 1.0, "c": 5.0, "d": 0.0}
    macs = {"a": 100, "b": 1, "c": 10, "d": 1}  # per MAC: b 1, c 0.5, a 0.1, d 0
    assert a8_layers(costs, macs, 0.0) == []
    assert a8_layers(costs, macs, 0.005) == []  # 0.56 of 112 MACs: not even b's 1
    assert a8_layers(costs, macs, 0.01) == ["b"]
    assert a8_layers(costs, macs, 11 / 112) == ["b", "c"]
    # a does not fit 50 %, but the greedy fill goes on (d costs nothing: never raised)
    assert a8_layers(costs, macs, 0.5) == ["b", "c"]
    assert a8_layers(costs, macs, 1.0) == ["a", "b", "c"]  # in costs order


@pytest.mark.parametrize("kwargs", [dict(a8_budget=1.5), dict(a8_budget=-0.1), dict(a8_budget=True),
                                    dict(a8_budget=0.1, scheme="w4a8")])
def test_bad_a8_budget_is_a_user_error(kwargs):
    with pytest.raises(UserError, match="a8-budget"):
        QuantizeConfig(**kwargs).validate()


def _quantized_up_blocks():
    """(model, calib) of sdxl-tiny's up_blocks.1 layers searched W4A4 and applied (captures kept)."""
    from exporter.calibration import collect_calibration
    from exporter.models import get_preset
    from exporter.quantize import apply_choices, calib_config, search_layers, select_layers

    cfg = QuantizeConfig(include=r"^up_blocks\.1\.", calib_samples=3, calib_steps=2, resolution=128,
                         max_tokens=128)
    preset, model = get_preset("sdxl-tiny"), tiny_fp()
    names, _ = select_layers(model, cfg.include, cfg.exclude_regex(preset))
    calib = collect_calibration(model, preset, calib_config(preset, cfg, "cpu"), capture=names)
    choices = search_layers(model, calib, names, cfg.search_space(), keep_captures=True)
    return apply_choices(model, choices), calib


def test_activation_costs_are_each_layers_own_end_to_end_error_and_its_macs():
    from exporter.models.presets import run_unet
    from exporter.quantize import activation_costs

    model, calib = _quantized_up_blocks()
    layers = dict(quant_layers(model))
    costs, macs = activation_costs(model, calib)
    assert set(costs) == set(macs) == set(layers)
    # the model comes back as it was: every quantizer on
    assert all(m.w_quant.enabled and m.a_quant.enabled for m in layers.values())
    # MACs: a Linear layer's are its tokens (what the capture saw, of A8_COST_SAMPLES of the
    # training samples) x in x out
    name = next(n for n, m in layers.items() if m.weight.dim() == 2)
    lin, n_train = layers[name], len(calib.train)
    used = min(A8_COST_SAMPLES, n_train)
    assert used < n_train  # the cost runs on a subset
    assert macs[name] == calib.layers[name].tokens_seen * used // n_train * lin.in_features * lin.out_features
    # the cost of the costliest layer, measured by hand: only its activations quantized
    top = max(costs, key=costs.get)
    assert costs[top] > 0
    idx = torch.tensor(calib.train[:A8_COST_SAMPLES])
    for m in layers.values():
        m.w_quant.enabled = m.a_quant.enabled = False
    with torch.no_grad():
        feeds = [{k: (v[idx] if v.dim() > 0 else v) for k, v in r.inputs.items()} for r in calib.records]
        ref = [run_unet(model, f) for f in feeds]
        layers[top].a_quant.enabled = True
        want = sum(float((run_unet(model, f) - y).pow(2).sum()) for f, y in zip(feeds, ref))
    assert costs[top] == pytest.approx(want, rel=1e-6)


def test_a8_budget_raises_the_chosen_layers_to_e4m3_within_the_budget():
    from exporter.quantize import quantize_model

    base = dict(TEST_CALIB, finetune_steps=0, evaluate=True, include=r"^up_blocks\.1\.")
    _, plain = quantize_model("sdxl-tiny", model=tiny_fp(), **base)
    model, report = quantize_model("sdxl-tiny", model=tiny_fp(), a8_budget=0.2, **base)
    rows = {r["name"]: r for r in report.layers}
    raised = {n for n, r in rows.items() if r["a_format"] in A8_FORMATS}
    assert raised and len(raised) < len(rows)
    assert all(r["a_format"] not in A8_FORMATS and r["a_format"].endswith(("m1", "m2", "m3", "m0"))
               for n, r in rows.items() if n not in raised)
    for name, layer in quant_layers(model):  # written into the layers, not only the report
        assert (layer.a_quant.fmt.name in A8_FORMATS) == (name in raised)
    assert report.a8["macs_share"] <= 0.2 and set(report.a8["layers"]) == raised
    # 8-bit activations where they cost the most: the model gets closer to the FP one
    assert report.metrics["ptq_eps_sqnr_db"] > plain.metrics["ptq_eps_sqnr_db"] + 0.5
    _, full = quantize_model("sdxl-tiny", model=tiny_fp(), a8_budget=1.0, **base)
    assert all(r["a_format"] in A8_FORMATS for r in full.layers)


def test_the_fp8_target_runs_e4m3_activation_layers_as_fp8(tmp_path):
    """A W4A4 export where some layers have e4m3 activations (what a8_budget makes): the fp8 target
    makes those layers FP8 GEMMs too (every e4m3 value is an E4M3FN value) and matches the
    reference target, which matches PyTorch."""
    from export_fixtures import ConvLinearStack, quantize_by_hand
    from exporter.export import export_onnx
    from exporter.parity import ort_session
    from graph_passes.targets import build_target

    torch.manual_seed(0)
    model, x = ConvLinearStack(c=16, d=32), torch.randn(2, 3, 8, 8)
    quantize_by_hand(model, (x,), talora=False, exclude=None)
    layers = dict(quant_layers(model))
    raised = ["conv1", "conv2"]  # signed and unsigned (zero point) activations before
    assert not layers["conv1"].a_quant.fmt.signed or not layers["conv2"].a_quant.fmt.signed
    absmax = {}
    hooks = [layers[n].register_forward_pre_hook(
        lambda m, a, n=n: absmax.__setitem__(n, float(a[0].abs().max()))) for n in raised]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        for n in raised:
            a = layers[n].a_quant
            a.set_format("e4m3")
            a.mode = "static"
            a.scale.fill_(absmax[n] / a.fmt.max)
        want = model(x).numpy()
    export_onnx(model, {"x": x}, tmp_path / "m.onnx", timestep_input=None)
    fp8 = build_target(tmp_path / "m.onnx", "fp8", tmp_path / "fp8.onnx", quiet=True)
    impl = {r["layer"]: r["impl"] for r in fp8["layers"]}
    assert all(impl[n] == "fp8" for n in raised), impl
    build_target(tmp_path / "m.onnx", "reference", tmp_path / "ref.onnx", quiet=True)
    run = {k: ort_session(tmp_path / f"{k}.onnx", threads=1).run(None, {"x": x.numpy()})[0]
           for k in ("fp8", "ref")}
    assert np.linalg.norm(run["fp8"] - run["ref"]) <= 1e-5 * np.linalg.norm(run["ref"])
    assert np.linalg.norm(run["ref"] - want) <= 1e-5 * np.linalg.norm(want)


def test_a8_convs_raises_every_convolution_and_no_linear_layer():
    """--a8-convs: no target runs a convolution on FP4 hardware, so every quantized convolution
    gets e4m3 activations (searched again on them) and the Linear layers stay W4A4."""
    from exporter.quantize import quantize_model

    model, report = quantize_model("sdxl-tiny", model=tiny_fp(), finetune_steps=0, a8_convs=True,
                                   **{**TEST_CALIB, "calib_samples": 2, "calib_steps": 2})
    layers = dict(quant_layers(model))
    convs = {n for n, l in layers.items() if l.weight.dim() == 4}
    assert convs and set(report.a8["layers"]) == convs and report.a8["convs"]
    for name, layer in layers.items():
        assert (layer.a_quant.fmt.name in A8_FORMATS) == (name in convs), (name, layer.a_quant.fmt.name)
    with pytest.raises(UserError, match="a8-convs"):
        QuantizeConfig(scheme="w4a8", a8_convs=True).validate()
