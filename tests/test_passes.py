"""Each graph pass alone, on small hand-built graphs: what it changes, and that outputs do not."""
import shutil

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx import TensorProto, helper, numpy_helper

from exporter import onnx_ops
from exporter.formats import get_format
from graph_passes.cleanup import cleanup
from graph_passes.fold_lora import fold_lora
from graph_passes.framework import PassContext, import_graph, load_graph, run_passes, save_graph, to_onnx
from graph_passes.fuse_fp4_gemm import fuse_fp4_gemm
from graph_passes.lora_files import LoraDelta, LoraFileError
from graph_passes.pack_mixed_precision import pack_mixed_precision
from graph_passes.quantize_weights import quantize_weights

K, N, T, ADAPTERS = 32, 24, 5, 3
TABLE = np.array([0, 0, 1, 1, 2, 2, 2, 1], np.int64)  # timestep -> adapter


def linear_graph(lora=None, mixed=False, a_fmt="ue2m2", dynamic=False, w_fmt="e2m1", seed=0):
    """x -> Q/DQ -> MatMul(., Transpose(DQ(Q(W [+ s B A])))) + bias, as the exporter emits it.
    ``lora``: None, "plain" or "talora" (adapter = Gather(TABLE, timestep))."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32)
    inits = {"layer.weight": w, "layer.bias": rng.standard_normal(N).astype(np.float32),
             "a_scale": np.float32(0.05), "a_zero": np.float32(-0.25),
             "w_scale": (np.abs(w).max(1, keepdims=True) / get_format(w_fmt).max).astype(np.float32),
             "w_zero": np.float32(0.0), "lora_s": np.float32(0.5)}
    nodes, w_src = [], "layer.weight"
    if lora == "plain":
        inits["lora_A"] = rng.standard_normal((2, K)).astype(np.float32)
        inits["lora_B"] = rng.standard_normal((N, 2)).astype(np.float32) * 0.1
        nodes += [helper.make_node("MatMul", ["lora_B", "lora_A"], ["ba"]),
                  helper.make_node("Mul", ["ba", "lora_s"], ["delta"]),
                  helper.make_node("Add", ["layer.weight", "delta"], ["w_eff"])]
        w_src = "w_eff"
    elif lora == "talora":
        inits["adapter_table"] = TABLE
        inits["lora_A"] = rng.standard_normal((ADAPTERS, 2, K)).astype(np.float32)
        inits["lora_B"] = rng.standard_normal((ADAPTERS, N, 2)).astype(np.float32) * 0.1
        nodes += [helper.make_node("Cast", ["timestep"], ["t_int"], to=TensorProto.INT64),
                  helper.make_node("Gather", ["adapter_table", "t_int"], ["adapter"]),
                  helper.make_node("Gather", ["lora_A", "adapter"], ["A_k"], axis=0),
                  helper.make_node("Gather", ["lora_B", "adapter"], ["B_k"], axis=0),
                  helper.make_node("MatMul", ["B_k", "A_k"], ["ba"]),
                  helper.make_node("Mul", ["ba", "lora_s"], ["delta"]),
                  helper.make_node("Add", ["layer.weight", "delta"], ["w_eff"])]
        w_src = "w_eff"
    bits = [3, 4, 5, 4] * (N // 4) if mixed else None
    nodes += [
        onnx_ops.make_quantize_node(["x", "a_scale", "a_zero"], ["xc", "xs", "xz"], a_fmt,
                                    dynamic=dynamic, name="layer.a_quant/QuantizeFP"),
        onnx_ops.make_dequantize_node(["xc", "xs", "xz"], ["xq"], a_fmt, name="layer.a_quant/DequantizeFP"),
        onnx_ops.make_quantize_node([w_src, "w_scale", "w_zero"], ["wc", "ws", "wz"], w_fmt,
                                    channel_bits=bits, axis=0, name="layer.w_quant/QuantizeFP"),
        onnx_ops.make_dequantize_node(["wc", "w_scale", "w_zero"], ["wq"], w_fmt, channel_bits=bits,
                                      name="layer.w_quant/DequantizeFP"),
        helper.make_node("Transpose", ["wq"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["xq", "wt"], ["mm"]),
        helper.make_node("Add", ["mm", "layer.bias"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, K]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [])]
    graph = helper.make_graph(nodes, "linear", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", T, N])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return onnx_ops.make_model(graph)


def run(model: onnx.ModelProto, timestep: float = 0.0, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((2, T, K)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"x": x, "timestep": np.array(timestep, np.float32)}
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})[0]


def apply(model, passes, ctx=None):
    graph = import_graph(onnx.load_from_string(model.SerializeToString()))
    records = run_passes(graph, passes, ctx or PassContext())
    return to_onnx(graph), records


def ops(model):
    return [n.op_type for n in model.graph.node]


def test_fold_lora_folds_plain_lora_into_one_weight():
    model = linear_graph("plain")
    folded, records = apply(model, [fold_lora])
    assert records[0].changes == {"folded": 1}
    assert "MatMul" in ops(folded) and ops(folded).count("MatMul") == 1  # only the layer's GEMM
    np.testing.assert_array_equal(run(folded), run(model))


@pytest.mark.parametrize("timestep", [0, 3, 6])
def test_fold_lora_stacks_one_weight_per_talora_adapter(timestep):
    model = linear_graph("talora")
    folded, records = apply(model, [fold_lora])
    assert records[0].changes == {"talora_layers": 1, "adapters": ADAPTERS}
    stacks = [i for i in folded.graph.initializer if i.name.endswith("weight_per_adapter")]
    assert len(stacks) == 1 and list(stacks[0].dims) == [ADAPTERS, N, K]
    np.testing.assert_array_equal(run(folded, timestep), run(model, timestep))


def test_fold_lora_applies_user_lora_files_before_quantization():
    model = linear_graph()
    rng = np.random.default_rng(5)
    delta = LoraDelta("layer", rng.standard_normal((2, K)).astype(np.float32),
                      rng.standard_normal((N, 2)).astype(np.float32), 0.3, "layer.lora_A.weight")
    folded, records = apply(model, [fold_lora, quantize_weights],
                            PassContext(options={"user_loras": [("user.safetensors", {"layer": delta})]}))
    assert records[0].changes["user_lora_layers"] == 1
    # same as a graph whose float weight already had the LoRA: re-quantized with the same scales
    expected = linear_graph()
    w = next(i for i in expected.graph.initializer if i.name == "layer.weight")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + delta.delta(), "layer.weight"))
    np.testing.assert_array_equal(run(folded), run(expected))
    assert not np.array_equal(run(folded), run(model))
    bad = LoraDelta("nonexistent.layer", delta.A, delta.B, 1.0, "nonexistent.lora_A.weight")
    with pytest.raises(LoraFileError, match="nonexistent.lora_A.weight"):
        apply(model, [fold_lora], PassContext(options={"user_loras": [("u.safetensors", {"x": bad})]}))


@pytest.mark.parametrize("lora", [None, "talora"])
def test_quantize_weights_leaves_codes_and_dequantize(lora):
    model = linear_graph(lora, mixed=True)
    quantized, _ = apply(model, [fold_lora, quantize_weights])
    assert ops(quantized).count("QuantizeFP") == 1  # the activation's
    codes = [i for i in quantized.graph.initializer if "codes" in i.name and "unit_scale" not in i.name]
    assert codes and all(c.data_type == TensorProto.INT8 for c in codes)
    # TensorRT takes an INT8 constant only in front of a DequantizeLinear
    users = {n.input[0]: n.op_type for n in quantized.graph.node}
    assert all(users[c.name] == "DequantizeLinear" for c in codes)
    assert not any(i.name == "layer.weight" for i in quantized.graph.initializer)
    for t in (0, 6):
        np.testing.assert_array_equal(run(quantized, t), run(model, t))


def test_pack_mixed_precision_groups_channels_by_width():
    model = linear_graph(mixed=True)
    ctx = PassContext()
    packed, records = apply(model, [fold_lora, quantize_weights, pack_mixed_precision], ctx)
    layout = ctx.metadata["layouts"]["layer"]
    assert layout["group_bits"] == [3, 4, 5] and layout["group_sizes"] == [N // 4, N // 2, N // 4]
    dq = next(n for n in packed.graph.node if n.op_type == "DequantizeFP")
    bits = list(helper.get_attribute_value(next(a for a in dq.attribute if a.name == "channel_bits")))
    assert bits == sorted(bits)
    np.testing.assert_array_equal(run(packed), run(model))


@pytest.mark.parametrize("lora, mixed, a_fmt, dynamic", [
    (None, False, "ue2m2", False), (None, True, "e2m1", True), ("talora", True, "e1m2", False)])
def test_fuse_fp4_gemm_makes_one_node_with_packed_int8_weights(lora, mixed, a_fmt, dynamic):
    model = linear_graph(lora, mixed=mixed, a_fmt=a_fmt, dynamic=dynamic)
    fused, records = apply(model, [fold_lora, quantize_weights, pack_mixed_precision, fuse_fp4_gemm,
                                   cleanup])
    fp4 = [n for n in fused.graph.node if n.op_type == "FP4Gemm"]
    assert len(fp4) == 1 and "MatMul" not in ops(fused) and "DequantizeFP" not in ops(fused)
    attrs = {a.name: helper.get_attribute_value(a) for a in fp4[0].attribute}
    assert attrs["plugin_namespace"] == b"export_engine" and attrs["plugin_version"] == b"1"
    w = next(i for i in fused.graph.initializer if i.name == fp4[0].input[1])
    expected_bytes = sum(n * ((K * b + 7) // 8) for b, n in zip(attrs["group_bits"], attrs["group_sizes"]))
    assert w.data_type == TensorProto.INT8 and list(w.dims) == [ADAPTERS if lora else 1, expected_bytes]
    assert not any(i.data_type == TensorProto.FLOAT and len(i.dims) == 2 and i.dims[0] == N
                   for i in fused.graph.initializer), "a float copy of the weight remains"
    for t in (0, 3, 6):
        np.testing.assert_allclose(run(fused, t), run(model, t), rtol=1e-6, atol=1e-6)


def test_cleanup_removes_noop_casts_and_identities():
    model = linear_graph()
    # y -> Cast(float) -> Identity -> out: both are no-ops
    model.graph.node[-1].output[0] = "y0"
    model.graph.node.extend([helper.make_node("Cast", ["y0"], ["y1"], to=TensorProto.FLOAT),
                             helper.make_node("Identity", ["y1"], ["y2"]),
                             helper.make_node("Relu", ["y2"], ["y"])])
    model = onnx.shape_inference.infer_shapes(model)  # the exporter writes these dtypes too
    cleaned, records = apply(model, [cleanup])
    assert records[0].changes == {"noop_casts": 1, "identities": 1, "dead_nodes": 2}
    assert "Cast" not in ops(cleaned) and "Identity" not in ops(cleaned)
    np.testing.assert_array_equal(run(cleaned), run(model))


def test_pipeline_names_the_pass_that_breaks_the_graph():
    def break_graph(graph, ctx):
        graph.nodes[-1].op = "NoSuchOp"
        return {"broken": 1}

    with pytest.raises(RuntimeError, match="break_graph"):
        apply(linear_graph(), [break_graph])


@pytest.mark.parametrize("external", [False, True])
def test_weights_load_lazily_and_stream_into_the_saved_data_file(tmp_path, external):
    """load_graph leaves external weights in their file until a pass asks; save_graph writes
    them (those no pass replaced too) into the new file, the same bytes every time."""
    model = linear_graph("plain", mixed=True)
    expected = run(apply(model, [fold_lora])[0])
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    saved = []
    for copy in ("a", "b"):
        graph = load_graph(src)
        weight = graph.tensors()["layer.weight"]
        assert isinstance(weight._values, LazyValues) and list(weight.shape) == [N, K]
        run_passes(graph, [fold_lora], PassContext())
        dest = tmp_path / copy / "m.onnx"
        data = save_graph(graph, dest, external_data=external)
        assert (data == dest.with_name("m.onnx.data")) if external else data is None
        assert sorted(p.name for p in dest.parent.iterdir()) == ["m.onnx"] + (["m.onnx.data"] if external else [])
        saved.append(dest)
    shutil.rmtree(src.parent)  # nothing may still point at the source's data file
    for dest in saved:
        np.testing.assert_array_equal(run(onnx.load(str(dest))), expected)
    for name in [p.name for p in saved[0].parent.iterdir()]:
        assert (saved[0].parent / name).read_bytes() == (saved[1].parent / name).read_bytes()
    if external:  # the folded weight (over 1 KiB) lives in the data file, the bias stays inline
        stored = onnx.load(str(saved[0]), load_external_data=False)
        outside = {t.name for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL}
        assert outside == {"layer.weight_folded"}
