"""lower_quant: the specialised standard-op form of each QuantizeFP/DequantizeFP equals the
generic function body, in ONNX Runtime, on every rounding midpoint and edge value."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_onnx_ops import FORMATS, _hard_values

from exporter import onnx_ops as oo
from exporter.formats import get_format
from graph_passes.framework import PassContext, import_graph, run_passes, to_onnx
from graph_passes.lower_quant import lower_quant, lower_quant_fold_weights


def _run_all(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # op semantics only
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return _run_all(model, feeds)[0]


def _lowered(model: onnx.ModelProto, lower=lower_quant) -> tuple[onnx.ModelProto, dict]:
    graph = import_graph(onnx.load_from_string(model.SerializeToString()))
    record = run_passes(graph, [lower], PassContext(), quiet=True)[0]
    out = to_onnx(graph)
    assert not any(n.domain == oo.DOMAIN for n in out.graph.node), "a pair was left generic"
    return out, record.changes


def _qdq(fmt, dynamic=False, x_dtype=np.float32, **kw) -> onnx.ModelProto:
    model = oo.qdq_model(fmt, [None, None], dynamic=dynamic, x_dtype=x_dtype, **kw)
    del model.graph.output[1:]  # the codes output: a graph that reads codes keeps QuantizeFP
    return model


def _assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got, want)  # NaN positions are equal; -0.0 == 0.0


@pytest.mark.parametrize("name", FORMATS)
def test_static_pair_equals_the_generic_body_on_every_midpoint(name):
    fmt = get_format(name)
    model = _qdq(fmt, scale=np.float32(0.37), zero_point=np.float32(-0.61))
    lowered, changes = _lowered(model)
    assert changes == {"activation_pairs": 1}
    x = _hard_values(fmt, np.random.default_rng(0))
    for scaled in (x, x * np.float32(0.37) - np.float32(0.61)):  # ties before and after scaling
        _assert_same(_run(lowered, {"x": scaled}), _run(model, {"x": scaled}))
    # fewer nodes than the generic bodies by an order of magnitude
    assert len(lowered.graph.node) < (len(oo.quantize_fp_function().node)
                                      + len(oo.dequantize_fp_function().node)) / 4


@pytest.mark.parametrize("name", FORMATS)
def test_codes_read_by_the_graph_equal_the_generic_body(name):
    """Debug exports output each layer's codes: the lowered pair computes them too."""
    fmt = get_format(name)
    model = oo.qdq_model(fmt, [None, None], scale=np.float32(0.37), zero_point=np.float32(-0.61))
    lowered, changes = _lowered(model)
    assert changes == {"activation_pairs": 1}
    x = _hard_values(fmt, np.random.default_rng(1))
    got, want = _run_all(lowered, {"x": x}), _run_all(model, {"x": x})
    _assert_same(got[0], want[0])
    assert got[1].dtype == np.int8
    np.testing.assert_array_equal(got[1], want[1])  # every code byte, -0.0 and NaN included
    z = np.float32(-0.61) * np.float32(1 - fmt.signed)  # docs/onnx_ops.md: a signed zero if signed
    np.testing.assert_array_equal(got[1].view(np.uint8), fmt.encode((x - z) / np.float32(0.37), nan="zero"))


@pytest.mark.parametrize("name", ["e2m1", "ue2m2", "ue3m1", "e4m3"])
def test_dynamic_pair_equals_the_generic_body(name):
    fmt = get_format(name)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 37, 48)) * rng.uniform(0.01, 10, (2, 37, 1))).astype(np.float32)
    x[0, 0] = 0.0  # the 1e-8 floor
    x[1, 3, :5] = [np.inf, -np.inf, np.nan, 1e-40, -0.0]
    for axis in (-1, 1):
        model = oo.qdq_model(fmt, [None, None, None], axis=axis, dynamic=True)
        del model.graph.output[1:]
        lowered, _ = _lowered(model)
        _assert_same(_run(lowered, {"x": x}), _run(model, {"x": x}))


@pytest.mark.parametrize("name", ["e2m1", "ue2m2"])
def test_fp16_pair_equals_the_generic_body(name):
    fmt = get_format(name)
    model = _qdq(fmt, x_dtype=np.float16, scale=np.float32(0.05), zero_point=np.float32(-0.2))
    lowered, _ = _lowered(model)
    x = _hard_values(fmt, np.random.default_rng(3)).astype(np.float16)
    _assert_same(_run(lowered, {"x": x}), _run(model, {"x": x}))


def _weight_model(fmt: str, bits, out_dtype=TensorProto.FLOAT, adapters: int = 0):
    """W (or a stack of W per adapter, selected by input k) -> Q -> DQ -> y (the weight)."""
    rng = np.random.default_rng(5)
    n, k = len(bits) if bits else 8, 16
    w = rng.standard_normal((adapters or 1, n, k)).astype(np.float32) * 3
    scale = (np.abs(w[0]).max(1, keepdims=True) / get_format(fmt).max).astype(np.float32)
    inits = [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.float32(-0.3), "z")]
    nodes, src = [], "W"
    if adapters:
        inits.append(numpy_helper.from_array(w, "W_stack"))
        nodes.append(helper.make_node("Gather", ["W_stack", "k"], ["W"], axis=0))
    else:
        inits.append(numpy_helper.from_array(w[0], "W"))
    nodes += [oo.make_quantize_node([src, "s", "z"], ["c", "", ""], fmt, channel_bits=bits, axis=0,
                                    name="layer.w_quant/QuantizeFP"),
              oo.make_dequantize_node(["c", "s", "z"], ["wq"], fmt, channel_bits=bits,
                                      output_dtype=out_dtype, name="layer.w_quant/DequantizeFP"),
              helper.make_node("Identity", ["wq"], ["y"])]
    inputs = [helper.make_tensor_value_info("k", TensorProto.INT64, [])] if adapters else []
    graph = helper.make_graph(nodes, "w", inputs, [helper.make_tensor_value_info("y", out_dtype, [n, k])],
                              inits)
    return oo.make_model(graph)


def _quantized(model):
    """quantize_weights needs a layer to match; here the weight pair alone is folded by hand."""
    from graph_passes.quantize_weights import code_tensor, encode_weight
    from graph_passes.patterns import node_attrs_format

    graph = import_graph(onnx.load_from_string(model.SerializeToString()))
    q = next(n for n in graph.nodes if n.op == "QuantizeFP")
    dq = next(n for n in graph.nodes if n.op == "DequantizeFP")
    fmt, bits = node_attrs_format(q)
    scale, zero = np.asarray(q.inputs[1].values), np.asarray(q.inputs[2].values)
    src = q.inputs[0]
    if not isinstance(src, gs.Constant):  # a Gather of a stack
        gather = src.inputs[0]
        stack = np.asarray(gather.inputs[0].values)
        codes = np.stack([encode_weight(w, fmt, bits, scale, zero) for w in stack])
        dq.inputs[0] = code_tensor(graph, "layer.weight_codes_per_adapter", codes, gather.inputs[1])
    else:
        dq.inputs[0] = code_tensor(graph, "layer.weight_codes",
                                   encode_weight(np.asarray(src.values), fmt, bits, scale, zero))
    q.outputs.clear()
    graph.cleanup()
    return to_onnx(graph)


@pytest.mark.parametrize("fmt,bits", [("e2m1", None), ("ue2m2", None), ("e2m1", [3, 4, 4, 5, 4, 3]),
                                      ("e4m3", None), ("ue3m1", [3, 4, 5, 4])])
@pytest.mark.parametrize("out_dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("adapters", [0, 3])
def test_weight_decode_and_fold_equal_the_generic_body(fmt, bits, out_dtype, adapters):
    codes_model = _quantized(_weight_model(fmt, bits, out_dtype, adapters))
    feeds_for = [{"k": np.array(a, np.int64)} for a in range(adapters)] if adapters else [{}]
    for lower, key in ((lower_quant, "weights_decoded"), (lower_quant_fold_weights, "weights_folded")):
        lowered, changes = _lowered(codes_model, lower)
        assert changes == {key: 1}
        if lower is lower_quant:  # no float copy of the weight: codes and a value table only
            floats = [i for i in lowered.graph.initializer if i.data_type in (1, 10)
                      and list(i.dims)[-2:] == [len(bits) if bits else 8, 16]]
            assert not floats, [i.name for i in floats]
        for feeds in feeds_for:
            _assert_same(_run(lowered, feeds), _run(codes_model, feeds))
