"""The roofline estimate (exporter.roofline): FLOPs and bytes per GEMM, the precision from the
engine report, and which GPUs a target is estimated for."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.roofline import GPUS, gemm_layers, peak, roofline


def _model(k=1024, n=1024):
    w = numpy_helper.from_array(np.zeros((k, n), np.float16), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["M", n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _report(precision):
    return {"engine_layers": [{"kind": "gemm", "precision": precision, "onnx_layers": ["mm"]}]}


def test_flops_come_from_the_shapes_at_the_given_profile():
    (row,) = gemm_layers(_model(), {"x": [4096, 1024]})
    assert row["flops"] == 2 * 4096 * 1024 * 1024 and row["weight_elems"] == 1024 * 1024


def test_large_m_is_compute_bound_and_fp8_halves_it_small_m_gains_from_weight_bytes():
    big = roofline(_model(), {"x": [8192, 1024]}, "fp8", _report("FP8"))["gpus"]["H100 SXM"]
    assert abs(big["speedup_vs_fp16"] - 2.0) < 0.05
    small = roofline(_model(8192, 8192), {"x": [8, 8192]}, "fp8", _report("FP8"))["gpus"]["H100 SXM"]
    assert 1.5 < small["speedup_vs_fp16"] <= 2.0  # weights: 1 byte instead of 2
    assert small["target"]["weight_bytes"] * 2 == small["fp16"]["weight_bytes"]
    # a layer the engine ran in Float gains nothing (slower than the fp16 engine)
    fl = roofline(_model(), {"x": [8192, 1024]}, "fp8", _report("Float"))["gpus"]["H100 SXM"]
    assert fl["speedup_vs_fp16"] < 1.0


def test_estimates_only_for_gpus_the_target_builds_for_and_labelled():
    r = roofline(_model(), {"x": [64, 1024]}, "fp8", _report("FP8"))
    assert set(r["gpus"]) == {"H100 SXM", "L40S", "RTX 4090"} and "ESTIMATE" in r["label"]
    r = roofline(_model(), {"x": [64, 1024]}, "native", _report("FP4"))
    assert set(r["gpus"]) == {"RTX 5090", "B200"}
    b200 = next(g for g in GPUS if g.name == "B200")
    assert peak(b200, "FP4") == 2 * peak(b200, "FP8") == 4 * peak(b200, "Half")


def test_the_estimate_says_how_many_gemms_it_covers():
    from exporter.roofline import summary_lines

    r = roofline(_model(), {"x": [64, 1024]}, "fp8", _report("FP8"))
    assert (r["layers"], r["gemm_nodes"]) == (1, 1)
    assert all("over 1 of 1 GEMMs/convs [estimate]" in line for line in summary_lines(r))
