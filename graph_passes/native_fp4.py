"""to_native_fp4: Blackwell NVFP4 (FLOAT4E2M1 weights, TensorRT's dynamic FP4 activation
quantizer) where a layer's quantization is expressible natively and exactly; every other
quantized layer is left to ``to_fp8`` (FP8, exact) or to its reference ops.

Runs after ``fold_lora`` and ``quantize_weights``. A layer becomes NVFP4 (the TensorRT / ModelOpt
convention: FLOAT4E2M1 weight initializer, block size 16 along K, FP8 E4M3 block scales behind a
DequantizeLinear by an fp32 per-tensor scale; activations through ``trt::TRT_FP4DynamicQuantize``)
when all of these hold (docs/targets.md says why):

- it is a Linear layer computing ``x @ W^T`` (MatMul behind a ``[1, 0]`` Transpose, or Gemm with
  ``transB=1``): TensorRT's FP4 GEMMs cover matrix multiplies only, not convolutions;
- its weight format is signed ``e2m1`` (default bias) with every channel at 4 bits: the only
  4-bit format the hardware decodes; mixed precision rows would need other grids;
- its weight codes are one constant (not a TALoRA stack selected per timestep): a FLOAT4E2M1
  weight must be an initializer feeding the DequantizeLinear;
- K is a multiple of 16 (whole NVFP4 blocks);
- its activations are NVFP4 blocks (``ActQuantizer(mode="nvfp4")``, what ``--nvfp4`` searches):
  the export computes each block's scale ``fp8_e4m3(amax / 6 / g) * g`` in the graph and
  quantizes by it; :func:`global_scale` recognises that subgraph by running it.

Why only those activations: TensorRT fuses into its FP4 GEMM only its own dynamic quantizer,
whose block scale follows each block's absmax; a static per-tensor FP4 Q/DQ is dequantized in a
pointwise kernel and the GEMM runs in Float (both checked with TensorRT-RTX for SM120 in
tests/test_engine_report.py). A static e2m1 layer is therefore left to FP8, where it runs exactly
on tensor cores.

Exactness. Our weight is ``table[code] * s_c`` with an fp32 scale per output channel. The NVFP4
weight keeps our codes byte for byte (same nibble layout), its FP8 block scales are 1.0 and its
per-tensor scale 1.0 (both exact), and ``s_c`` becomes a per-channel ``Mul`` after the GEMM (a
GEMM epilogue in TensorRT): ``x @ (s_c * W)^T == (x @ W^T) * s_c`` up to fp32 rounding order.
Activations: ``TRT_FP4DynamicQuantize(x, g)`` then ``DequantizeLinear(scales, g)`` and
``DequantizeLinear(x_fp4, block 16)`` give exactly the model's values; the graph carries the op's
semantics as a model-local function (:func:`dynamic_quantize_function`) so ONNX Runtime and
``onnx.reference`` run it (TensorRT uses its built-in op), and each layer is checked against an
ml_dtypes simulation (:func:`nvfp4_dynamic_quantize`) below.

Dynamic per-token activations (scale = row absmax / 6) are not NVFP4 either: the report gives
the error switching such a layer to NVFP4 blocks would add (``nvfp4_dynamic_rel_l2``, simulated
with the best per-tensor scale for the test batch) so the trade can be judged per layer.

Every quantized layer gets a ``ctx.layer_report`` row ``{"layer", "target": "native", "impl":
"nvfp4" | "reference ops", "why", "added_rel_l2"}``: ``added_rel_l2`` is the relative L2 error of
the layer's output against the exact reference (float64 over the reference's fp32 dequantized
operands) on seeded random inputs over the layer's calibrated activation range (block maxima up to
``6 * 448 * g``, one all-zero block), the native subgraph run by ``onnx.reference``; 0.0 for layers
left to other passes.
Options (``ctx.options``): ``native_check_tokens`` (rows of the random input; 0 skips the
measurement and reports ``None``), ``native_seed``.
"""
from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from exporter.formats import get_format
from exporter.packing import pack

from .framework import PassContext
from .patterns import GEMM_OPS, QuantLayer, constant_value, find_quant_layers, node_attrs_format, \
    producer

#: the ONNX opset of FLOAT4E2M1 QuantizeLinear / DequantizeLinear
NVFP4_OPSET = 23
BLOCK = 16
E2M1 = get_format("e2m1")
FP8_MAX = 448.0
#: TensorRT's dynamic FP4 activation quantizer, the only one its FP4 GEMMs take
TRT_DOMAIN, DYNAMIC_QUANTIZE = "trt", "TRT_FP4DynamicQuantize"
DEFAULT_CHECK_TOKENS = 64


# ---------------------------------------------------------------------------------------------
# Eligibility
# ---------------------------------------------------------------------------------------------
class _Plan:
    """What an eligible layer needs: codes [N, K] uint8, s_c [N], s_a, bias or None, gemm kind."""

    def __init__(self, codes, w_scale, a_scale, bias_add, bias, x, dtype):
        self.codes, self.w_scale, self.a_scale = codes, w_scale, a_scale
        self.bias_add, self.bias, self.x, self.dtype = bias_add, bias, x, dtype


def _is_xwt(layer: QuantLayer) -> bool:
    """The layer computes x @ W^T with W the DequantizeFP output, nothing else in between."""
    op = layer.op
    if op.op == "Gemm":
        a = op.attrs
        return (not layer.layout and a.get("transB", 0) == 1 and a.get("transA", 0) == 0
                and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0)
    return (len(layer.layout) == 1 and layer.layout[0].op == "Transpose"
            and list(layer.layout[0].attrs.get("perm", [1, 0])) == [1, 0])


def weight_codes(t: gs.Tensor) -> tuple[np.ndarray | None, bool]:
    """(uint8 codes, selected per adapter?) of a weight DequantizeFP's codes input as
    quantize_weights leaves it (:func:`graph_passes.quantize_weights.read_codes`), or a plain
    INT8/UINT8 initializer. Codes are None for anything else; for TALoRA they are the stack."""
    if isinstance(t, gs.Constant):
        values = np.asarray(t.values)
        if values.dtype.kind in "iu" and values.dtype.itemsize == 1:
            return values.view(np.uint8), False
        return None, False
    from .quantize_weights import read_codes

    codes, index, _ = read_codes(t)
    if codes is None:
        node = producer(t)  # a TALoRA stack selected another way still is per adapter
        return None, bool(node is not None and node.op == "Gather")
    return (codes, True) if index is not None else (codes[0], False)


def _is_e2m1(node: gs.Node) -> bool:
    fmt, _ = node_attrs_format(node)
    return fmt.name == "e2m1" and int(node.attrs.get("bias", fmt.bias)) == fmt.bias


def _upstream_constant(t: gs.Tensor, name: str, stop: gs.Tensor, limit: int = 64) -> gs.Constant | None:
    """The constant called ``name`` among the inputs of the nodes computing ``t`` (not above
    ``stop``; at most ``limit`` nodes): a local walk, where ``graph.tensors()`` would index the whole
    graph once per layer (minutes on SDXL)."""
    seen, todo = set(), [t]
    while todo and len(seen) < limit:
        node = producer(todo.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for i in node.inputs:
            if isinstance(i, gs.Constant) and i.name == name:
                return i
            if i is not stop and not isinstance(i, gs.Constant):
                todo.append(i)
    return None


def global_scale(graph: gs.Graph, layer: QuantLayer) -> np.float32 | None:
    """The calibrated global scale g when the layer's activations are NVFP4 blocks (the export of
    ``ActQuantizer(mode="nvfp4")``: a static QuantizeFP/DequantizeFP pair whose scale input is
    exporter.quantizers.nvfp4_block_scale of the layer's own input), else None.

    The candidate g is the layer's ``a_quant.scale`` initializer; it is accepted only if the
    graph's scale subgraph, run on a test input, gives exactly :func:`nvfp4_block_scales` of it."""
    from .evaluate import evaluate

    s_in, x = layer.a_q.inputs[1], layer.a_q.inputs[0]
    dq_in = layer.a_dq.inputs[1]
    if isinstance(s_in, gs.Constant) or not (dq_in is s_in or (len(layer.a_q.outputs) > 1
                                                                and dq_in is layer.a_q.outputs[1])):
        return None
    if x.shape is None:
        return None
    g_t = _upstream_constant(s_in, f"{layer.name}.a_quant.scale", stop=x)
    g = constant_value(graph, g_t) if g_t is not None else None
    if g is None or g.size != 1 or not (np.isfinite(g).all() and float(g.reshape(())) > 0):
        return None
    g = np.float32(g.reshape(()))
    k = x.shape[-1]
    if not isinstance(k, int) or k % BLOCK:
        return None
    x_test = _block_test_input(layer.name, g, list(x.shape), 0).astype(x.dtype or np.float32)
    try:  # computable from the layer input alone?
        got = np.asarray(evaluate(graph, [s_in], {x.name: x_test})[0], np.float32)
    except Exception:  # noqa: BLE001 - it reads another input: not this quantizer
        return None
    want = np.repeat(nvfp4_block_scales(x_test.astype(np.float32), g), BLOCK, axis=-1)
    return g if got.shape == want.shape and np.array_equal(got, want) else None


def plan_layer(graph: gs.Graph, layer: QuantLayer) -> tuple[_Plan | None, str]:
    """(plan, why): a plan when the layer is expressible as exact NVFP4, else None and the reason."""
    if layer.op.op not in GEMM_OPS:
        return None, "convolution: TensorRT's NVFP4 GEMMs cover Linear (MatMul/Gemm) layers only"
    if not _is_xwt(layer):
        return None, "weight is not used as x @ W^T"
    w_fmt, bits = node_attrs_format(layer.w_dq)
    if not _is_e2m1(layer.w_dq):
        return None, f"weight format {w_fmt.name} is not signed e2m1 (the only NVFP4 grid)"
    if any(b != 4 for b in bits):
        return None, "mixed-precision weight channels (3/4/5 bits): NVFP4 has one 4-bit grid"
    codes, per_adapter = weight_codes(layer.w_dq.inputs[0])
    if per_adapter:
        return None, ("TALoRA: weight codes are selected per timestep (Gather of an adapter "
                      "stack); NVFP4 weights must be one initializer")
    if codes is None:
        return None, "weight codes are not constant (run quantize_weights first)"
    if codes.ndim != 2:
        return None, f"weight codes have rank {codes.ndim}, not 2"
    n, k = codes.shape
    if k % BLOCK:
        return None, f"K = {k} is not a multiple of the NVFP4 block size {BLOCK}"
    if codes.max(initial=0) > 15:
        return None, "weight codes exceed 4 bits"
    w_scale = constant_value(graph, layer.w_dq.inputs[1])
    if w_scale is None or w_scale.size != n or not np.all(np.isfinite(w_scale)):
        return None, "weight scale is not a finite per-channel constant"
    if layer.a_q is None or layer.a_dq is None:
        return None, "activations are not quantized (NVFP4 GEMMs take FP4 activations)"
    a_fmt, _ = node_attrs_format(layer.a_q)
    if not _is_e2m1(layer.a_q) or not _is_e2m1(layer.a_dq):
        return None, (f"activation format {a_fmt.name} is not signed e2m1"
                      + (" (it has a zero point)" if not a_fmt.signed else ""))
    if int(layer.a_q.attrs.get("dynamic", 0)):
        return None, ("dynamic per-token activation scales: NVFP4 activations are block-16 dynamic "
                      "with FP8 scales under an initializer per-tensor scale, not the same grid")
    s_a = global_scale(graph, layer)
    if s_a is None:
        return None, ("static per-tensor e2m1 activations: TensorRT fuses only its block-16 dynamic "
                      "FP4 quantizer into an FP4 GEMM (a static FP4 Q/DQ is dequantized and the GEMM "
                      "runs in Float), so this layer runs faster, and exactly, in FP8; `--nvfp4` "
                      "quantizes Linear activations the NVFP4 way")
    x = layer.a_q.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype) not in (np.float32, np.float16):
        return None, f"activation dtype {x.dtype} is not float32/float16"
    add, bias_t = layer.bias_add()
    bias = None if bias_t is None else np.asarray(bias_t.values)
    if bias is not None and bias.size != n:
        return None, "bias is not per output channel"
    dtype = np.dtype(x.dtype) if x.dtype is not None else np.dtype(np.float32)
    return _Plan(codes, w_scale.reshape(n).astype(np.float32), s_a, add, bias, x, dtype), ""


# ---------------------------------------------------------------------------------------------
# NVFP4 subgraph
# ---------------------------------------------------------------------------------------------
def fp4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """A FLOAT4E2M1 tensor holding e2m1 codes [N, K] as they are (two a byte, element 0 in the
    low nibble: the same bytes as exporter.packing's 4-bit layout)."""
    t = onnx.TensorProto()
    t.name, t.data_type = name, onnx.TensorProto.FLOAT4E2M1
    t.dims.extend(codes.shape)
    t.raw_data = pack(codes.astype(np.uint8), 4).tobytes()
    return t


def fp4_weight(name: str, codes: np.ndarray) -> gs.Constant:
    """:func:`fp4_tensor` as a graph constant."""
    return gs.Constant(name, LazyValues(fp4_tensor(name, codes)))


def _v(name: str, dtype, shape=None) -> gs.Variable:
    return gs.Variable(name, dtype=dtype, shape=shape)


def emit_nvfp4(name: str, plan: _Plan, op: str, x: gs.Tensor, out: gs.Tensor) -> list[gs.Node]:
    """Nodes computing the layer from ``x`` into ``out`` (g: the global scale):

    x -[Cast f32]-> trt::TRT_FP4DynamicQuantize(g) -> (x fp4, block scales fp8)
      DequantizeLinear(block scales, g) -> DequantizeLinear(x fp4, axis -1, block 16) -[Cast]-> x_dq
    DequantizeLinear(fp8 ones [N, K/16], 1.0) -> DequantizeLinear(W fp4 [N, K], axis 1, block 16)
      -> Transpose -> MatMul -> Mul(s_c) [-> Add(bias)] -> out

    A layer exported as a rank-2 Gemm (SDXL's time_emb_proj) runs as that MatMul on [1, M, K],
    between an Unsqueeze and a Squeeze, which are exact: TensorRT-RTX 1.7 segfaults building an
    fp16 network whose dynamic FP4 quantizer feeds a rank-2 GEMM, and in fp32 runs that GEMM in
    Float; at rank 3 both build FP4 GEMMs (tests/test_engine_report.py).
    """
    n, k = plan.codes.shape
    f32, dt = np.float32, plan.dtype
    nodes: list[gs.Node] = []
    final = None
    if op == "Gemm":  # rank 2: the MatMul on [1, M, K] (see above)
        x3 = _v(f"{name}.nvfp4.x_rank3", dt)
        nodes.append(gs.Node("Unsqueeze", f"{name}/nvfp4/unsqueeze", {},
                             [x, gs.Constant(f"{name}.nvfp4.axis0", np.array([0], np.int64))], [x3]))
        x, final = x3, out
        out = _v(f"{name}.nvfp4.out_rank3", dt)
    xin = x
    if dt != np.float32:
        xin = _v(f"{name}.nvfp4.x_f32", f32)
        nodes.append(gs.Node("Cast", f"{name}/nvfp4/cast_in", {"to": onnx.TensorProto.FLOAT},
                             [x], [xin]))
    g = gs.Constant(f"{name}.nvfp4.input_scale_2", np.asarray(plan.a_scale, f32))
    xq, xs = _v(f"{name}.nvfp4.x_fp4", None), _v(f"{name}.nvfp4.x_block_scale", None)
    nodes.append(gs.Node(DYNAMIC_QUANTIZE, f"{name}/nvfp4/input_quantize",
                         {"axis": -1, "block_size": BLOCK, "scale_type": onnx.TensorProto.FLOAT8E4M3FN},
                         [xin, g], [xq, xs], domain=TRT_DOMAIN))
    xsd = _v(f"{name}.nvfp4.x_block_scale_dq", f32)
    nodes.append(gs.Node("DequantizeLinear", f"{name}/nvfp4/input_scale_dequantize", {}, [xs, g], [xsd]))
    xdq = _v(f"{name}.nvfp4.x_dq", f32)
    nodes.append(gs.Node("DequantizeLinear", f"{name}/nvfp4/input_dequantize",
                         {"axis": -1, "block_size": BLOCK}, [xq, xsd], [xdq]))
    if dt != np.float32:
        x16 = _v(f"{name}.nvfp4.x_dq_cast", dt)
        nodes.append(gs.Node("Cast", f"{name}/nvfp4/cast_dq", {"to": onnx.helper.np_dtype_to_tensor_dtype(dt)},
                             [xdq], [x16]))
        xdq = x16
    # weights: FP8 block scales (all 1.0) under an fp32 per-tensor scale (1.0), then FP4 codes
    block_scale = gs.Constant(f"{name}.nvfp4.weight_block_scale",
                              np.ones((n, k // BLOCK), np.float32).astype(ml_dtypes.float8_e4m3fn))
    global_scale = gs.Constant(f"{name}.nvfp4.weight_scale_2", np.asarray(1.0, dt))
    bs = _v(f"{name}.nvfp4.weight_block_scale_dq", dt, [n, k // BLOCK])
    nodes.append(gs.Node("DequantizeLinear", f"{name}/nvfp4/weight_scale_dequantize", {},
                         [block_scale, global_scale], [bs]))
    w = _v(f"{name}.nvfp4.weight_dq", dt, [n, k])
    nodes.append(gs.Node("DequantizeLinear", f"{name}/nvfp4/weight_dequantize",
                         {"axis": 1, "block_size": BLOCK},
                         [fp4_weight(f"{name}.nvfp4.weight", plan.codes), bs], [w]))
    acc = _v(f"{name}.nvfp4.gemm_out", dt)
    wt = _v(f"{name}.nvfp4.weight_t", dt, [k, n])
    nodes.append(gs.Node("Transpose", f"{name}/nvfp4/weight_transpose", {"perm": [1, 0]}, [w], [wt]))
    nodes.append(gs.Node("MatMul", f"{name}/nvfp4/matmul", {}, [xdq, wt], [acc]))
    s_c = gs.Constant(f"{name}.nvfp4.channel_scale", plan.w_scale.astype(dt))
    if plan.bias is None:
        nodes.append(gs.Node("Mul", f"{name}/nvfp4/channel_scale", {}, [acc, s_c], [out]))
    else:
        scaled = _v(f"{name}.nvfp4.scaled", dt)
        nodes.append(gs.Node("Mul", f"{name}/nvfp4/channel_scale", {}, [acc, s_c], [scaled]))
        b = gs.Constant(f"{name}.nvfp4.bias", np.asarray(plan.bias).astype(dt))
        nodes.append(gs.Node("Add", f"{name}/nvfp4/bias", {}, [scaled, b], [out]))
    if final is not None:
        nodes.append(gs.Node("Squeeze", f"{name}/nvfp4/squeeze", {},
                             [out, gs.Constant(f"{name}.nvfp4.axis0_out", np.array([0], np.int64))], [final]))
    return nodes


def dynamic_quantize_function() -> onnx.FunctionProto:
    """``trt::TRT_FP4DynamicQuantize(x, g) -> (x FLOAT4E2M1, block scales FLOAT8E4M3FN)`` as a
    model-local function, so that ONNX Runtime's and onnx.reference's runs of the native graph
    mean what TensorRT's built-in op computes (TensorRT-RTX still uses its own: checked in
    tests/test_engine_report.py). Blocks of 16 along the last axis; the body is
    :func:`nvfp4_block_scales`: ``s = fp8(min(amax / 6 / g, 448))``, codes
    ``QuantizeLinear(x, s * g)`` (division, round half to even, saturation), an all-zero block
    quantized by 1 (codes 0 either way)."""
    h, T = onnx.helper, onnx.TensorProto

    def const(name, value):
        return h.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value), name))

    nodes = [
        const("blk", np.array([-1, BLOCK], np.int64)), const("last", np.array([-1], np.int64)),
        const("six", np.float32(6.0)), const("fp8max", np.float32(FP8_MAX)),
        const("one", np.float32(1.0)), const("zero", np.float32(0.0)),
        h.make_node("Cast", ["x"], ["xf"], to=T.FLOAT),
        h.make_node("Cast", ["global_scale"], ["g"], to=T.FLOAT),
        h.make_node("Shape", ["xf"], ["lead"], end=-1),
        h.make_node("Concat", ["lead", "blk"], ["blocks"], axis=0),
        h.make_node("Reshape", ["xf", "blocks"], ["xb"]),
        h.make_node("Abs", ["xb"], ["ab"]),
        h.make_node("ReduceMax", ["ab", "last"], ["amax"], keepdims=0),
        h.make_node("Div", ["amax", "six"], ["a6"]),
        h.make_node("Div", ["a6", "g"], ["ag"]),
        h.make_node("Min", ["ag", "fp8max"], ["agc"]),
        h.make_node("Cast", ["agc"], ["scale"], to=T.FLOAT8E4M3FN),
        h.make_node("Cast", ["scale"], ["sf"], to=T.FLOAT),
        h.make_node("Mul", ["sf", "g"], ["s"]),
        h.make_node("Greater", ["s", "zero"], ["positive"]),
        h.make_node("Where", ["positive", "s", "one"], ["safe"]),
        h.make_node("QuantizeLinear", ["xf", "safe"], ["y"], axis=-1, block_size=BLOCK,
                    output_dtype=T.FLOAT4E2M1),
    ]
    return h.make_function(TRT_DOMAIN, DYNAMIC_QUANTIZE, ["x", "global_scale"], ["y", "scale"], nodes,
                           [h.make_opsetid("", NVFP4_OPSET)], attributes=["axis", "block_size", "scale_type"],
                           doc_string="TensorRT's dynamic NVFP4 quantizer (graph_passes/native_fp4.py)")


def add_dynamic_quantize_function(graph: gs.Graph) -> None:
    """The local function and the ``trt`` domain import, once per graph."""
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    if not any(f.name == DYNAMIC_QUANTIZE and f.domain == TRT_DOMAIN for f in graph.functions):
        graph.functions.append(OnnxImporter.import_function(dynamic_quantize_function(),
                                                            model_opset=NVFP4_OPSET))
    domains = list(graph.import_domains or [onnx.helper.make_opsetid("", int(graph.opset))])
    if not any(d.domain == TRT_DOMAIN for d in domains):
        domains.append(onnx.helper.make_opsetid(TRT_DOMAIN, 1))
    graph.import_domains = domains


def rewrite_layer(graph: gs.Graph, layer: QuantLayer, plan: _Plan) -> None:
    """Replace the layer (activation Q/DQ, weight DQ, layout, GEMM, bias Add) by the NVFP4 nodes;
    the layer's output tensor (and everything reading it) stays."""
    out = plan.bias_add.outputs[0] if plan.bias_add is not None else layer.op.outputs[0]
    layer.op.outputs.clear()
    if plan.bias_add is not None:
        plan.bias_add.outputs.clear()
    graph.nodes.extend(emit_nvfp4(layer.name, plan, layer.op.op, plan.x, out))


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _rel_l2(y: np.ndarray, ref: np.ndarray) -> float:
    d = np.linalg.norm((np.asarray(y, np.float64) - ref).ravel())
    r = np.linalg.norm(ref.ravel())
    return float(d / r) if r > 0 else float(d)


def reference_weight(plan: _Plan) -> np.ndarray:
    """The reference graph's dequantized weight, fp32: s_c * table[code] (DequantizeFP)."""
    return (plan.w_scale[:, None] * E2M1.table[plan.codes]).astype(np.float32)


def run_native_layer(name: str, plan: _Plan, op: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(layer output, dequantized activations) of the emitted NVFP4 nodes, by onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    xin = _v("x", plan.dtype, list(x.shape))
    y = _v("y", plan.dtype, [x.shape[0], plan.codes.shape[0]])
    nodes = emit_nvfp4(name, plan, op, xin, y)
    xdq = next(nd.outputs[0] for nd in nodes if nd.name.endswith("/nvfp4/input_dequantize"))
    g = gs.Graph(nodes=nodes, inputs=[xin], outputs=[y, xdq], opset=NVFP4_OPSET)
    add_dynamic_quantize_function(g)
    g.outputs[1].dtype = np.float32
    model = gs.export_onnx(g)
    model.ir_version = 10
    y_out, xdq_out = ReferenceEvaluator(model).run(None, {"x": x.astype(plan.dtype)})
    return np.asarray(y_out), np.asarray(xdq_out)


def _block_test_input(name: str, g: np.float32, shape: list, seed: int) -> np.ndarray:
    """Seeded activations over the calibrated range (block absmax up to 6 * 448 * g, tokens of
    random magnitude), one all-zero block included; symbolic dims of ``shape`` become 8 (the
    second to last, tokens) or 1."""
    dims = [d if isinstance(d, int) else (8 if i == len(shape) - 2 else 1) for i, d in enumerate(shape)]
    rng = _rng(name, seed)
    tokens, k = int(np.prod(dims[:-1])), dims[-1]
    x = rng.uniform(-1, 1, (tokens, k)) * np.exp(rng.uniform(-4, 0, (tokens, 1))) * 6.0 * FP8_MAX * g
    x[0, :BLOCK] = 0.0
    return x.reshape(dims).astype(np.float32)


def measure_nvfp4(name: str, plan: _Plan, op: str, tokens: int, seed: int) -> tuple[float, bool]:
    """(relative L2 of the NVFP4 layer vs the exact reference, activation values identical?): the
    reference quantizes the activations with :func:`nvfp4_dynamic_quantize` (ml_dtypes casts, not
    our encoder) and multiplies float64 operands."""
    # in the layer's dtype (an fp16 export's activations are fp16 values)
    x = _block_test_input(name, plan.a_scale, [tokens, plan.codes.shape[1]], seed)
    x = x.astype(plan.dtype).astype(np.float32)
    x_ref = nvfp4_dynamic_quantize(x, float(plan.a_scale))
    ref = x_ref.astype(np.float64) @ reference_weight(plan).astype(np.float64).T
    if plan.bias is not None:
        ref = ref + plan.bias.astype(np.float64)
    y, x_dq = run_native_layer(name, plan, op, x)
    # (a Gemm layer quantizes its activations as [1, M, K]: emit_nvfp4)
    return _rel_l2(y, ref), bool(np.array_equal(x_dq.reshape(x_ref.shape), x_ref))


def nvfp4_block_scales(x: np.ndarray, global_scale: float) -> np.ndarray:
    """Block scales [..., K/16] of TensorRT's dynamic NVFP4 activation quantizer, by ml_dtypes:
    ``fp8_e4m3(min(amax / 6 / g, 448)) * g``, 1 for an all-zero block (whose codes are 0 either
    way). exporter.quantizers.nvfp4_block_scale is the PyTorch side (tested equal)."""
    xb = x.reshape(x.shape[:-1] + (-1, BLOCK)).astype(np.float32)
    g = np.float32(global_scale)
    amax = np.abs(xb).max(-1) / np.float32(6.0) / g
    s = np.minimum(amax, np.float32(FP8_MAX)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * g
    return np.where(s > 0, s, np.float32(1))


def nvfp4_dynamic_quantize(x: np.ndarray, global_scale: float) -> np.ndarray:
    """Dequantized values of TensorRT's dynamic NVFP4 activation quantizer (simulated): per block
    of 16 along the last axis, the block scale above, values rounded to e2m1 by ml_dtypes."""
    xb = x.reshape(x.shape[:-1] + (-1, BLOCK)).astype(np.float32)
    s = nvfp4_block_scales(x, global_scale)[..., None]
    q = (xb / s).astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s
    return q.reshape(x.shape)


def measure_dynamic_alternative(name: str, codes: np.ndarray, w_scale: np.ndarray, tokens: int,
                                seed: int) -> float:
    """Relative L2 that NVFP4 dynamic activations (block 16, FP8 scales, best per-tensor scale)
    would add to a per-token e2m1 layer, on tokens of random magnitude."""
    k = codes.shape[1]
    rng = _rng(name, seed)
    x = (rng.standard_normal((tokens, k)) * np.exp(rng.standard_normal((tokens, 1)))).astype(np.float32)
    s_t = np.maximum(np.abs(x).max(-1, keepdims=True) / np.float32(6.0), np.float32(1e-8))
    x_ref = E2M1.table[E2M1.encode((x / s_t).astype(np.float32), nan="zero")] * s_t
    x_nv = nvfp4_dynamic_quantize(x, float(np.abs(x).max()) / (6.0 * FP8_MAX))
    w = (w_scale.reshape(-1, 1) * E2M1.table[codes]).astype(np.float64)
    ref = x_ref.astype(np.float64) @ w.T
    return _rel_l2(x_nv.astype(np.float64) @ w.T, ref)


def _dynamic_e2m1_candidate(graph: gs.Graph, layer: QuantLayer):
    """(codes, w_scale) when the layer would be NVFP4 but for its dynamic per-token activations."""
    if layer.a_q is None or not int(layer.a_q.attrs.get("dynamic", 0)) or not _is_e2m1(layer.a_q):
        return None
    if layer.op.op not in GEMM_OPS or not _is_xwt(layer) or not _is_e2m1(layer.w_dq):
        return None
    if any(b != 4 for b in node_attrs_format(layer.w_dq)[1]):
        return None
    codes, per_adapter = weight_codes(layer.w_dq.inputs[0])
    if codes is None or per_adapter:
        return None
    w_scale = constant_value(graph, layer.w_dq.inputs[1])
    if codes.ndim != 2 or codes.shape[1] % BLOCK or w_scale is None or w_scale.size != codes.shape[0]:
        return None
    return codes, w_scale


def raise_opset(graph: gs.Graph, opset: int) -> None:
    """Standard-domain opset to at least ``opset``: the graph's and its local functions' (the
    checker wants one version per domain; our function bodies mean the same under opset 23)."""
    for g in [graph] + list(graph.functions):
        g.opset = max(int(g.opset), opset)
        for imp in g.import_domains or []:
            if imp.domain in ("", "ai.onnx"):
                imp.version = max(int(imp.version), opset)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------
def to_native_fp4(graph: gs.Graph, ctx: PassContext) -> dict:
    tokens = int(ctx.options.get("native_check_tokens", DEFAULT_CHECK_TOKENS))
    seed = int(ctx.options.get("native_seed", 0))
    rows, native = [], 0
    for layer in find_quant_layers(graph):
        plan, why = plan_layer(graph, layer)
        if plan is None:
            row = {"layer": layer.name, "target": "native", "impl": "reference ops", "why": why,
                   "added_rel_l2": 0.0, "kind": layer.kind, "node": layer.op.name}
            cand = _dynamic_e2m1_candidate(graph, layer)
            if cand is not None:
                row["nvfp4_dynamic_rel_l2"] = (measure_dynamic_alternative(layer.name, *cand, tokens, seed)
                                               if tokens > 0 else None)
            rows.append(row)
            continue
        row = {"layer": layer.name, "target": "native", "impl": "nvfp4", "kind": layer.kind,
               "node": f"{layer.name}/nvfp4/matmul",
               "why": ("Linear with e2m1 weights (4 bit) and NVFP4 block activations: weight codes "
                       "as they are, FP8 block scales 1.0, channel scale after the GEMM; activations by "
                       "TensorRT's dynamic FP4 quantizer with the calibrated global scale"),
               "added_rel_l2": None}
        if tokens > 0:
            rel, same = measure_nvfp4(layer.name, plan, layer.op.op, tokens, seed)
            if not same:
                raise AssertionError(f"{layer.name}: the NVFP4 activation quantizer does not "
                                     "reproduce the reference's values")
            row["added_rel_l2"] = rel
        rewrite_layer(graph, layer, plan)
        rows.append(row)
        native += 1
    if native:
        raise_opset(graph, NVFP4_OPSET)
        add_dynamic_quantize_function(graph)
    ctx.layer_report.extend(rows)
    measured = [r["added_rel_l2"] for r in rows if r["impl"] == "nvfp4" and r["added_rel_l2"] is not None]
    ctx.metadata["native"] = {"nvfp4": native, "reference_ops": len(rows) - native,
                              "max_added_rel_l2": max(measured) if measured else 0.0,
                              "opset": int(graph.opset)}
    return {"nvfp4_layers": native, "reference_ops_layers": len(rows) - native} if rows else {}
