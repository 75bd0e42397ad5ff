"""to_fp8: each quantized Linear and Conv as FP8 (E4M3) Q/DQ around its GEMM, numerics unchanged.

Runs after ``fold_lora`` and ``quantize_weights`` (and, in the ``native`` target, after
``to_native_fp4``: the layers it left become FP8 instead of float). Ada (sm_89) and Hopper
(sm_90) have FP8 tensor cores but no FP4 ones; every value of our 3/4/5-bit formats is an E4M3
value (:func:`exact_in_e4m3`), so a W4A4 layer runs on FP8 tensor cores with the quantized
model's numerics. TensorRT fuses the pattern below into one FP8 GEMM or convolution when the
DequantizeLinear nodes feed the MatMul/Gemm/Conv (through a Transpose at most), their scales are
constants and the weight is a FLOAT8E4M3FN initializer (docs/targets.md; checked with
TensorRT-RTX 1.7 for SM89, tests/test_engine_report.py).

A layer ``y = a @ W^T`` with ``a = z_a + s_a * v_a`` (the activation pair's output: grid value
``v_a``, scale and zero point per tensor or per token) and ``W = s_w * v_w`` (per output channel)
becomes::

    a (lowered QuantizeFP/DequantizeFP, unchanged) -[Cast f32]-[Sub z_a]-> QuantizeLinear(s_a, E4M3)
      -> DequantizeLinear(s_a) -[Cast]-> MatMul | Gemm | Conv <- [Transpose] <- [Cast] <-
      DequantizeLinear(axis 0, s_w) <- v_w (FLOAT8E4M3FN initializer)
      -> [Mul s_t (per token)] -> [Add z_a * rowsum(W)] -> [Add bias]

* Static scales: ``QuantizeLinear(a - z_a, s_a)`` divides and rounds to nearest even in E4M3.
  ``a - z_a`` is ``s_a * v_a`` within a few fp32 ulps and ``v_a`` is an E4M3 value, so the
  rounding gives back ``v_a`` exactly; ``DequantizeLinear`` then computes ``s_a * v_a``, the
  product the reference computes (signed formats: the very same tensor).
* Per-token scales ``s_t`` (not constants, which TensorRT's FP8 Q/DQ needs): the layer quantizes
  ``(a - z_t) / s_t`` with scale 1.0 (that is ``v_a``) and multiplies the GEMM output by ``s_t``
  (a GEMM epilogue); ``s_t``, ``z_t`` are computed by the same ops as the lowered pair
  (:func:`graph_passes.lower_quant.dynamic_scale`). Linear layers only: a convolution mixes
  positions that have different scales.
* Unsigned formats (zero point ``z``): ``(z + s v) @ W^T = s (v @ W^T) + z * rowsum(W)``; the
  second term is a per-channel constant for Linear layers. For a convolution, zero padding pads
  ``a``, not ``v``, so the term differs at the borders: it is computed as a convolution of a
  one-channel image filled with ``z`` by the weight summed over input channels (``N x kh x kw``
  floats, no float copy of the weight).
* Weights: the codes' values (``table[code]``, mixed-precision rows each with their own table) as
  a FLOAT8E4M3FN initializer; ``DequantizeLinear`` multiplies by the fp32 channel scale, the
  reference's ``s_w * table[code]`` in fp32 (fp16 exports: then the same Cast). TALoRA weight
  stacks (one code set per adapter, selected per timestep): the FP8 stack is dequantized with
  scale 1.0, the adapter gathered and quantized again with scale 1.0 (exact), so the GEMM still
  sees an FP8 Q/DQ weight (TensorRT accepts FP8 tensors only into DequantizeLinear).

Not FP8 (reference ops, with the reason in the report): unsigned weight formats (a zero point per
weight channel would need a per-token activation sum), formats whose values are not all E4M3
values (8-bit formats, integers above 16), per-token convolutions, grouped convolutions with a
zero point, weights used other than ``x @ W^T`` when a zero point is to be folded.

Every quantized layer gets a ``ctx.layer_report`` row; in the native target the row of a layer it
left is updated (``impl`` "fp8", the NVFP4 reason kept as ``nvfp4_why``). ``ctx.metadata["fp8"]``
holds the counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.helper import tensor_dtype_to_np_dtype
from onnx_graphsurgeon.logger import G_LOGGER

from exporter.formats import Format, with_bits

from .framework import PassContext
from .lower_quant import _Emitter, _replace, decode_weight, dynamic_scale
from .patterns import GEMM_OPS, QuantLayer, constant_value, find_quant_layers, node_attrs_format
from .quantize_weights import read_codes

#: FLOAT8E4M3FN QuantizeLinear / DequantizeLinear (19) with the export's opset (21)
FP8_OPSET = 21
E4M3 = ml_dtypes.float8_e4m3fn


def exact_in_e4m3(values: np.ndarray) -> bool:
    """Every finite value is an FP8 E4M3 value (so FP8 tensor cores compute with it unchanged)."""
    v = np.asarray(values, np.float32)
    v = v[np.isfinite(v)]
    return bool(np.all(v.astype(E4M3).astype(np.float32) == v))


def format_exact_in_e4m3(fmt: Format, channel_bits: list[int]) -> bool:
    return all(exact_in_e4m3(with_bits(fmt, int(b)).table) for b in set(channel_bits))


@dataclass
class Fp8Plan:
    """What a layer needs. ``values``: the weight codes' values [A?, N, ...] float32 (A: TALoRA
    adapters, with ``index`` the adapter-index tensor); ``w_scale`` [N] fp32; activation ``a_scale``
    / ``a_zero`` fp32 scalars (static) or None (per token, ``axes``); ``rowsum`` [A?, N] of the
    reference weight (zero point folding) or None; ``dtype``: the layer's float type."""

    values: np.ndarray
    index: gs.Tensor | None
    w_scale: np.ndarray
    a_fmt: Format
    a_scale: np.float32 | None
    a_zero: np.float32 | None
    axes: list[int] | None
    rowsum: np.ndarray | None
    w_sum: np.ndarray | None  # conv zero point: weight summed over input channels [A?, N, 1, kh, kw]
    dtype: np.dtype

    @property
    def dynamic(self) -> bool:
        return self.a_scale is None

    @property
    def zero_point(self) -> bool:
        return not self.a_fmt.signed


def _static_scalar(graph: gs.Graph, t: gs.Tensor) -> np.float32 | None:
    v = constant_value(graph, t)
    return None if v is None or v.size != 1 else np.float32(v.reshape(()))


def plan_layer(graph: gs.Graph, layer: QuantLayer) -> tuple[Fp8Plan | None, str]:
    """(plan, "") when the layer is expressible as exact FP8, else (None, why)."""
    op = layer.op
    if layer.a_q is None or layer.a_dq is None:
        return None, "activations are not quantized (weight-only layers keep float activations)"
    w_fmt, w_bits = node_attrs_format(layer.w_dq)
    if not w_fmt.signed:
        return None, (f"unsigned weight format {w_fmt.name}: its per-channel zero point would need a "
                      "per-token sum of the activations")
    if not format_exact_in_e4m3(w_fmt, w_bits):
        return None, f"weight format {w_fmt.name} ({sorted(set(w_bits))} bits) has values E4M3 cannot hold"
    a_fmt, a_bits = node_attrs_format(layer.a_q)
    if len(a_bits) != 1 or not format_exact_in_e4m3(a_fmt, a_bits):
        return None, f"activation format {a_fmt.name} has values E4M3 cannot hold"
    a_fmt = with_bits(a_fmt, a_bits[0])
    codes, index, _ = read_codes(layer.w_dq.inputs[0])
    if codes is None:
        return None, "weight codes are not constant (run quantize_weights first)"
    n = codes.shape[1]
    w_scale = constant_value(graph, layer.w_dq.inputs[1])
    w_zero = constant_value(graph, layer.w_dq.inputs[2])
    if w_scale is None or w_scale.size != n or not np.all(np.isfinite(w_scale)) or w_zero is None:
        return None, "weight scale is not a finite per-channel constant"
    w_scale = w_scale.reshape(n).astype(np.float32)
    x = layer.a_q.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype) not in (np.float32, np.float16):
        return None, f"activation dtype {x.dtype} is not float32/float16"
    dtype = np.dtype(tensor_dtype_to_np_dtype(int(layer.a_dq.attrs.get("output_dtype",
                                                                    onnx.TensorProto.FLOAT))))
    dynamic = bool(int(layer.a_q.attrs.get("dynamic", 0)))
    a_scale = a_zero = axes = None
    if dynamic:
        axes = [int(a) for a in layer.a_q.attrs["axes"]]
        rank = len(x.shape) if x.shape is not None else None
        if op.op not in GEMM_OPS or not (axes == [-1] or (rank is not None and axes == [rank - 1])):
            return None, ("per-token activation scales on a convolution: its output mixes positions "
                          "with different scales, so the scale cannot follow the GEMM")
    else:
        a_scale = _static_scalar(graph, layer.a_q.inputs[1])
        dq_in = layer.a_dq.inputs[1]
        dq_scale = a_scale if len(layer.a_q.outputs) > 1 and dq_in is layer.a_q.outputs[1] \
            else _static_scalar(graph, dq_in)
        if a_scale is None and constant_value(graph, layer.a_q.inputs[1]) is None:
            return None, ("activation scales are computed from the activations (NVFP4 blocks of 16): "
                          "they vary along K, so they cannot leave the dot product; the native target "
                          "runs such a layer as an FP4 GEMM")
        if a_scale is None or dq_scale is None or a_scale != dq_scale or not (np.isfinite(a_scale)
                                                                              and a_scale > 0):
            return None, "activation scale is not one positive per-tensor constant"
        a_zero = np.float32(0.0)
        if not a_fmt.signed:
            a_zero = _static_scalar(graph, layer.a_q.inputs[2])
            if a_zero is None or not np.isfinite(a_zero):
                return None, "activation zero point is not one per-tensor constant"
    # the codes' values (scale 1, zero 0): exact in float32, and (checked above) in E4M3
    values = np.stack([decode_weight(c, layer.w_dq, np.ones((), np.float32), np.zeros((), np.float32))
                       .astype(np.float32) for c in codes])
    rowsum = w_sum = None
    if not a_fmt.signed:
        ref = np.stack([decode_weight(c, layer.w_dq, w_scale.reshape((n,) + (1,) * (c.ndim - 1)), w_zero)
                        .astype(np.float64) for c in codes])
        if op.op == "Conv":
            if int(op.attrs.get("group", 1)) != 1:
                return None, "grouped convolution with an activation zero point"
            w_sum = ref.sum(axis=2, keepdims=True).astype(np.float32)
        else:
            from .native_fp4 import _is_xwt

            if not _is_xwt(layer):
                return None, "weight is not used as x @ W^T (needed to fold the activation zero point)"
            rowsum = ref.reshape(ref.shape[0], n, -1).sum(-1).astype(np.float32)
    if index is None:
        values = values[0]
        rowsum = None if rowsum is None else rowsum[0]
        w_sum = None if w_sum is None else w_sum[0]
    return Fp8Plan(values, index, w_scale, a_fmt, a_scale, a_zero, axes, rowsum, w_sum, dtype), ""


# ---------------------------------------------------------------------------------------------
# Emission
# ---------------------------------------------------------------------------------------------
def fp8_constant(name: str, values: np.ndarray) -> gs.Constant:
    """A FLOAT8E4M3FN initializer (values must be E4M3 values: the cast is then exact)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    a = np.ascontiguousarray(np.asarray(values, np.float32).astype(E4M3))
    t = onnx.TensorProto()
    t.name, t.data_type = name, onnx.TensorProto.FLOAT8E4M3FN
    t.dims.extend(a.shape)
    t.raw_data = a.tobytes()
    with G_LOGGER.suppress(G_LOGGER.ERROR):  # "FLOAT8E4M3FN has no numpy type": kept as ONNX's, as meant
        return gs.Constant(name, LazyValues(t))


def _onnx_type(dtype: np.dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class _Fp8Emitter(_Emitter):
    def cast(self, t: gs.Tensor, dtype) -> gs.Tensor:
        if t.dtype is not None and np.dtype(t.dtype) == np.dtype(dtype):
            return t
        return self.op("Cast", t, to=_onnx_type(dtype), dtype=np.dtype(dtype))

    def qdq(self, t: gs.Tensor, scale: np.ndarray, axis: int | None = None) -> gs.Tensor:
        """DequantizeLinear(QuantizeLinear(t, scale) to E4M3, scale); fp32 in and out. The E4M3
        zero point (0) gives the output type, which works from opset 19 on."""
        s = self.const(scale)
        zp = fp8_constant(f"{self.prefix}/zero_point{self.n}", np.zeros(np.shape(scale), np.float32))
        attrs = {} if axis is None else {"axis": axis}
        q = self.op("QuantizeLinear", t, s, zp, dtype=None, **attrs)
        return self.op("DequantizeLinear", q, s, zp, **attrs)

    def dequantize_fp8(self, name: str, values: np.ndarray, scale: np.ndarray, axis: int | None = None
                       ) -> gs.Tensor:
        zp = fp8_constant(f"{name}_zero_point", np.zeros(np.shape(scale), np.float32))
        attrs = {} if axis is None else {"axis": axis}
        return self.op("DequantizeLinear", fp8_constant(name, values), self.const(scale), zp, **attrs)


def _weight(e: _Fp8Emitter, name: str, plan: Fp8Plan) -> gs.Tensor:
    """The layer's weight s_w * v_w as FP8 Q/DQ, in the layer's dtype."""
    if plan.index is None:
        w = e.dequantize_fp8(f"{name}.fp8.weight", plan.values, plan.w_scale, axis=0)
    else:  # TALoRA: select the adapter between two exact scale-1 Q/DQ steps
        stack = e.dequantize_fp8(f"{name}.fp8.weight_per_adapter", plan.values, np.float32(1.0))
        chosen = e.op("Gather", stack, plan.index, axis=0)
        s = e.const(plan.w_scale)
        zp = fp8_constant(f"{name}.fp8.weight_zero_point", np.zeros(plan.w_scale.shape, np.float32))
        q = e.op("QuantizeLinear", chosen, e.const(np.float32(1.0)),
                 fp8_constant(f"{name}.fp8.unit_zero_point", np.zeros((), np.float32)), dtype=None)
        w = e.op("DequantizeLinear", q, s, zp, axis=0)
    return e.cast(w, plan.dtype)


def _select(e: _Fp8Emitter, values: np.ndarray, index: gs.Tensor | None, dtype) -> gs.Tensor:
    """A per-layer constant, or its row for the active adapter."""
    c = e.const(values, dtype)
    return c if index is None else e.op("Gather", c, index, axis=0, dtype=dtype)


def rewrite_layer(graph: gs.Graph, layer: QuantLayer, plan: Fp8Plan) -> None:
    """Insert the FP8 nodes: the activation pair and the layout nodes stay, the weight
    DequantizeFP is replaced, epilogue ops (per-token scale, zero point, bias) follow the GEMM."""
    op, dt = layer.op, plan.dtype
    e = _Fp8Emitter(graph, f"{layer.name}/fp8")
    a = e.cast(op.inputs[0], np.float32)
    if plan.dynamic:
        xf = e.cast(layer.a_q.inputs[0], np.float32)
        s_t, z_t = dynamic_scale(e, xf, plan.a_fmt, plan.axes)
        u = e.op("Div", e.op("Sub", a, z_t) if plan.zero_point else a, s_t)
        a_fp8 = e.qdq(u, np.float32(1.0))
    else:
        u = e.op("Sub", a, e.const(plan.a_zero)) if plan.zero_point else a
        a_fp8 = e.qdq(u, plan.a_scale)
    op.inputs[0] = e.cast(a_fp8, dt)
    _replace(graph, layer.w_dq.outputs[0], _weight(e, layer.name, plan))
    layer.w_dq.outputs.clear()

    epilogue = plan.dynamic or plan.zero_point
    if not epilogue:
        return
    out = op.outputs[0]
    bias = None
    if op.op in ("Gemm", "Conv") and len(op.inputs) > 2:  # the bias goes after the epilogue
        bias = op.inputs[2]
        del op.inputs[2]
    acc = gs.Variable(f"{layer.name}/fp8/acc", dtype=dt)
    op.outputs = [acc]
    y = acc
    if plan.dynamic:
        y = e.op("Mul", y, e.cast(s_t, dt), dtype=dt)
        if plan.zero_point:
            y = e.op("Add", y, e.op("Mul", e.cast(z_t, dt), _select(e, plan.rowsum, plan.index, dt), dtype=dt),
                     dtype=dt)
    elif plan.rowsum is not None:  # z * rowsum(W): one constant per channel (and adapter)
        y = e.op("Add", y, _select(e, plan.rowsum * plan.a_zero, plan.index, dt), dtype=dt)
    elif plan.w_sum is not None:
        y = e.op("Add", y, _border_term(e, op, plan), dtype=dt)
    if bias is not None:
        if op.op == "Conv":
            bias = e.op("Reshape", bias, e.const([-1, 1, 1], np.int64), dtype=dt)
        y = e.op("Add", y, bias, dtype=dt)
    graph.nodes.append(gs.Node("Identity", f"{layer.name}/fp8/out", inputs=[y], outputs=[out]))


def _border_term(e: _Fp8Emitter, conv: gs.Node, plan: Fp8Plan) -> gs.Tensor:
    """z * conv(ones, W summed over input channels): the zero point's share of a padded
    convolution, border positions included."""
    dt = plan.dtype
    x = conv.inputs[0]
    shape = e.op("Shape", x, dtype=np.int64)
    one_channel = e.op("Concat", e.op("Slice", shape, e.const([0], np.int64), e.const([1], np.int64),
                                      dtype=np.int64),
                       e.const([1], np.int64),
                       e.op("Slice", shape, e.const([2], np.int64), e.const([2 ** 62], np.int64),
                            dtype=np.int64), axis=0, dtype=np.int64)
    filled = e.op("ConstantOfShape", one_channel, dtype=dt,
                  value=onnx.numpy_helper.from_array(np.asarray([plan.a_zero], dt)))
    attrs = {k: v for k, v in conv.attrs.items() if k in ("pads", "strides", "dilations", "auto_pad",
                                                           "kernel_shape")}
    if "kernel_shape" in attrs:
        attrs["kernel_shape"] = list(attrs["kernel_shape"])
    return e.op("Conv", filled, _select(e, plan.w_sum, plan.index, dt), dtype=dt, **attrs)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------
FP8_WHY = "FP8 E4M3 Q/DQ: 4-bit values exact in E4M3, per-channel weight scale, {act}"


def to_fp8(graph: gs.Graph, ctx: PassContext) -> dict:
    target = ctx.options.get("target", "fp8")
    existing = {r["layer"]: r for r in ctx.layer_report}
    fp8 = kept = 0
    for layer in find_quant_layers(graph):
        plan, why = plan_layer(graph, layer)
        if plan is not None:
            act = ("per-token activation scale after the GEMM" if plan.dynamic
                   else "per-tensor activation scale") + (", zero point folded" if plan.zero_point else "")
            row = {"layer": layer.name, "target": target, "impl": "fp8", "why": FP8_WHY.format(act=act),
                   "kind": layer.kind, "node": layer.op.name,
                   "adapters": 1 if plan.index is None else int(plan.values.shape[0])}
            codes_const = read_codes(layer.w_dq.inputs[0])[2]
            rewrite_layer(graph, layer, plan)
            # the codes are dead now (their FP8 copy replaces them); dropping them here rather
            # than at the pass's cleanup keeps one byte per weight, not two, in memory on SDXL
            codes_const.values = np.zeros((0,) * codes_const.values.ndim, np.int8)
            fp8 += 1
        else:
            row = {"layer": layer.name, "target": target, "impl": "reference ops", "why": why,
                   "kind": layer.kind, "node": layer.op.name}
            kept += 1
        if layer.name in existing:  # the native target: NVFP4 was not possible here
            old = existing[layer.name]
            measured = {k: old[k] for k in ("added_rel_l2", "nvfp4_dynamic_rel_l2") if k in old}
            why_not_nvfp4 = old["why"]
            old.clear()
            old.update(row, nvfp4_why=why_not_nvfp4, **measured)
        else:
            ctx.layer_report.append(row)
    if fp8:
        from .native_fp4 import raise_opset

        raise_opset(graph, FP8_OPSET)
    ctx.metadata["fp8"] = {"fp8": fp8, "reference_ops": kept, "opset": int(graph.opset)}
    return {"fp8_layers": fp8, "reference_ops_layers": kept} if fp8 or kept else {}
