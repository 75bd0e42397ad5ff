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


def test_shapes_flow_through_group_norm_and_computed_reshapes_and_attention_operands_are_activations():
    """What ONNX's own inference cannot size (GroupNormalization gives no shape; a Reshape whose
    shape is computed from Shape -> Gather -> Concat), and attention's q @ k^T: both operands come
    from the input, so nothing of it counts as weight bytes."""
    T = TensorProto
    nodes = [
        helper.make_node("GroupNormalization", ["x", "g", "b"], ["n"], num_groups=2, name="gn"),
        helper.make_node("Shape", ["n"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b0"], axis=0),
        helper.make_node("Mul", ["s", "two"], ["s2"]),
        helper.make_node("Gather", ["s2", "i1"], ["c2"], axis=0),
        helper.make_node("Concat", ["b0", "c2", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["n", "shape"], ["r"]),  # [B, 2C, HW/2]
        helper.make_node("Transpose", ["r"], ["q"], perm=[0, 2, 1]),  # [B, HW/2, 2C]
        helper.make_node("MatMul", ["q", "w"], ["p"], name="proj"),
        helper.make_node("Transpose", ["p"], ["pt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["p", "pt"], ["att"], name="qk"),
    ]
    inits = [numpy_helper.from_array(np.ones(4, np.float32), "g"), numpy_helper.from_array(np.zeros(4, np.float32), "b"),
             numpy_helper.from_array(np.array([0], np.int64), "i0"), numpy_helper.from_array(np.array([1], np.int64), "i1"),
             numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.zeros((8, 16), np.float32), "w")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, ["B", 4, "H", "W"])],
                          [helper.make_tensor_value_info("att", T.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    assert not [v for v in inferred.graph.value_info if v.name == "r" and v.type.tensor_type.shape.dim]
    rows = {r["node"]: r for r in gemm_layers(model, {"x": [3, 4, 6, 6]})}
    assert rows["proj"]["flops"] == 2 * 3 * 18 * 16 * 8 and rows["proj"]["weight_elems"] == 8 * 16
    assert rows["qk"]["flops"] == 2 * 3 * 18 * 18 * 16 and rows["qk"]["weight_elems"] == 0
    assert rows["qk"]["act_elems"] == 2 * 3 * 18 * 16 + 3 * 18 * 18
