"""The `export_engine` ONNX op domain (version 1): QuantizeFP, DequantizeFP, FP4Gemm.

Every op ships as a model-local ONNX function (a ``FunctionProto`` of standard
ops only) that is its exact definition, so ONNX Runtime, ``onnx.reference`` and
TensorRT's parser run or inline it. One function serves every node: the
format enters through attribute references (``ref_attr_name``), never through a
per-node copy of the body. The schema is in docs/onnx_ops.md.

How the bodies stay bit-exact with :mod:`exporter.formats`:

* encode is the same algorithm as ``formats._encode_magnitude``:
  ``e = clamp(floor(log2 a), emin, emax)``, ``code = (e - emin) * 2**m +
  round_half_even(a * 2**(m - e))``, clamped to the largest code. ``floor(log2
  a)`` is exact: a Log gives a guess that can be off by one, and two
  comparisons against exact powers of two (gathered from a table, never
  computed by Pow) correct it. Scaling by ``2**(m - e)`` is a multiply by an
  exact table entry. ONNX ``Round`` is half-to-even, like ``torch.round``.
* the sign is taken as ``x < 0 or 1/x < 0`` so that -0.0 keeps its sign bit;
  unsigned formats map negatives (and -0) to code 0; NaN encodes as code 0,
  except in E4M3 whose NaN code is kept.
* DequantizeFP decodes by a Gather from ``Format.table`` (the ``table``
  attribute), the same table the PyTorch, numpy and CUDA code use.
* per-channel bit widths (mixed precision) are the ``channel_bits`` attribute
  (one entry per channel along axis 0, or a single entry for the whole
  tensor); each channel's format is :func:`exporter.formats.with_bits` of the
  node's format, derived inside the body from ``signed/ebits/mbits/bias``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .formats import Format, get_format, with_bits

DOMAIN = "export_engine"
DOMAIN_VERSION = 1
#: default ONNX opset of models that use the domain (ReduceMax with an axes input needs 18)
DEFAULT_OPSET = 21

_POW2_KMIN, _POW2_KMAX = -149, 127  # every power of two that float32 holds exactly


def opset_imports(opset: int = DEFAULT_OPSET) -> list[onnx.OperatorSetIdProto]:
    """The opset imports a model using this domain needs (standard ops + ours)."""
    return [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]


def _check_supported(fmt: Format) -> None:
    if fmt.kind != "float":
        raise ValueError(
            f"format {fmt.name!r}: QuantizeFP/DequantizeFP encode minifloats ([u]eXmY) only; "
            "integer formats are not supported by the ONNX export"
        )
    if fmt.ebits > 6:
        raise ValueError(f"format {fmt.name!r}: at most 6 exponent bits are supported in ONNX")


# ---------------------------------------------------------------------------------------------
# Function-body builder
# ---------------------------------------------------------------------------------------------
class _Body:
    """Collects the nodes of one function body with deterministic, unique value names."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}  # one Constant per value: bodies are inlined per node

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self._n += 1
        outs = [f"{self.prefix}{self._n}_{op_type}" + (f"_{i}" if outputs > 1 else "")
                for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs if outputs > 1 else outs[0]

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.op("Constant", value=numpy_helper.from_array(arr))
        return self._consts[key]

    def ref(self, attr: str, kind: str) -> str:
        """A Constant whose value is the node attribute ``attr`` (kind: int, ints, float, floats)."""
        self._n += 1
        out = f"{self.prefix}{self._n}_attr_{attr}"
        a = onnx.AttributeProto()
        a.name = f"value_{kind}"
        a.ref_attr_name = attr
        a.type = {"int": onnx.AttributeProto.INT, "ints": onnx.AttributeProto.INTS,
                  "float": onnx.AttributeProto.FLOAT,
                  "floats": onnx.AttributeProto.FLOATS}[kind]
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def reduce_all(self, op_type: str, x: str) -> str:
        """Scalar reduction of a tensor of any rank (TensorRT reduces no rank-0 tensor)."""
        flat = self.op("Reshape", x, self.const([-1], np.int64))
        return self.op(op_type, flat, keepdims=0)

    def f32(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)

    def i64(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.INT64)

    def pow2(self, exponent_f: str) -> str:
        """2**k for float-typed integer k, exactly (table lookup, k clamped to float32's range)."""
        table = self.const(np.ldexp(np.float32(1), np.arange(_POW2_KMIN, _POW2_KMAX + 1)))
        k = self.op("Clip", exponent_f, self.const(_POW2_KMIN), self.const(_POW2_KMAX))
        idx = self.i64(self.op("Sub", k, self.const(_POW2_KMIN)))
        return self.op("Gather", table, idx)


@dataclass
class _FormatTensors:
    """Names of float32 tensors (broadcastable against the magnitudes) describing the format."""

    signed: str  # bool scalar
    emin: str
    emax: str
    mbits: str
    pow2_m: str
    bias: str
    max_code: str
    sign_mask: str
    nan_code: str  # 127 for E4M3, else 0
    nan_fmt: str  # bool: the format has a NaN code


def _format_tensors(b: _Body, signed: str, ebits: str, mbits: str, bias: str,
                    bits: str) -> _FormatTensors:
    """Per-channel minifloat parameters from the base format and a (broadcastable) bit width.

    Mirrors :func:`exporter.formats.with_bits`: a width change trades mantissa
    bits; when the mantissa is empty the exponent shrinks; formats other than
    the base one get the default bias 2**(e-1) - 1. All inputs are float32.
    """
    one, zero = b.const(1.0), b.const(0.0)
    mb = b.op("Sub", b.op("Sub", bits, signed), ebits)
    eb_c = b.op("Add", ebits, b.op("Min", mb, zero))
    mb_c = b.op("Max", mb, zero)
    default_bias = b.op("Sub", b.pow2(b.op("Sub", eb_c, one)), one)
    bias_c = b.op("Where", b.op("Equal", eb_c, ebits), bias, default_bias)
    emin = b.op("Sub", one, bias_c)
    emax = b.op("Sub", b.op("Sub", b.pow2(eb_c), one), bias_c)
    signed_b = b.op("Cast", signed, to=TensorProto.BOOL)
    nan_fmt = b.op("And", signed_b, b.op("And", b.op("Equal", eb_c, b.const(4.0)),
                                         b.op("Equal", mb_c, b.const(3.0))))
    top = b.op("Sub", b.pow2(b.op("Add", eb_c, mb_c)), one)
    max_code = b.op("Sub", top, b.f32(nan_fmt))
    sign_mask = b.op("Mul", signed, b.pow2(b.op("Add", eb_c, mb_c)))
    nan_code = b.op("Where", nan_fmt, top, zero)
    return _FormatTensors(signed_b, emin, emax, mb_c, b.pow2(mb_c), bias_c, max_code, sign_mask,
                          nan_code, nan_fmt)


def _encode(b: _Body, u: str, f: _FormatTensors) -> str:
    """float32 values (already divided by the scale) -> float32 codes (exact small integers)."""
    zero, one = b.const(0.0), b.const(1.0)
    nan = b.op("IsNaN", u)
    u0 = b.op("Where", nan, zero, u)
    # x < 0 catches -inf (1/-inf is -0, not < 0); 1/x < 0 catches -0.0
    neg = b.op("Or", b.op("Less", u0, zero), b.op("Less", b.op("Div", one, u0), zero))
    mag = b.op("Where", b.op("And", neg, b.op("Not", f.signed)), zero, b.op("Abs", u0))
    # floor(log2 mag): a Log guess within +-1, clamped so that it indexes the power table,
    # then corrected exactly by comparisons against 2**e0 and 2**(e0 + 1)
    lo = b.op("Sub", b.reduce_all("ReduceMin", f.emin), one)
    hi = b.op("Add", b.reduce_all("ReduceMax", f.emax), one)
    guess = b.op("Floor", b.op("Mul", b.op("Log", mag), b.const(1.0 / math.log(2.0))))
    e0 = b.op("Max", b.op("Min", guess, hi), lo)  # Max/Min map -inf (mag 0) and inf to the ends
    too_big = b.f32(b.op("Less", mag, b.pow2(e0)))
    too_small = b.f32(b.op("GreaterOrEqual", mag, b.pow2(b.op("Add", e0, one))))
    e = b.op("Add", b.op("Sub", e0, too_big), too_small)
    e = b.op("Max", b.op("Min", e, f.emax), f.emin)
    r = b.op("Round", b.op("Mul", mag, b.pow2(b.op("Sub", f.mbits, e))))
    code = b.op("Add", b.op("Mul", b.op("Sub", e, f.emin), f.pow2_m), r)
    code = b.op("Max", b.op("Min", code, f.max_code), zero)
    code = b.op("Add", code, b.op("Where", neg, f.sign_mask, zero))  # sign_mask is 0 unsigned
    return b.op("Where", nan, f.nan_code, code)


def _decode_formula(b: _Body, code: str, f: _FormatTensors) -> str:
    """float32 codes -> float32 values, by the bit-field formula (same values as Format.table)."""
    zero = b.const(0.0)
    neg = b.op("And", f.signed, b.op("GreaterOrEqual", code, f.sign_mask))
    mag = b.op("Sub", code, b.op("Where", neg, f.sign_mask, zero))
    e_field = b.op("Floor", b.op("Div", mag, f.pow2_m))
    m_field = b.op("Sub", mag, b.op("Mul", e_field, f.pow2_m))
    sub = b.op("Mul", m_field, b.pow2(b.op("Sub", f.emin, f.mbits)))
    normal = b.op("Mul", b.op("Add", f.pow2_m, m_field),
                  b.pow2(b.op("Sub", b.op("Sub", e_field, f.bias), f.mbits)))
    val = b.op("Where", b.op("Equal", e_field, zero), sub, normal)
    val = b.op("Where", neg, b.op("Neg", val), val)
    is_nan = b.op("And", f.nan_fmt, b.op("Equal", mag, f.nan_code))
    return b.op("Where", is_nan, b.const(np.nan), val)


def _dynamic_params(b: _Body, xf: str, axes: str, signed_b: str, fmax: str) -> tuple[str, str]:
    """Per-token (scale, zero_point) of ActQuantizer.dynamic_params (keepdims along ``axes``)."""
    eps = b.const(1e-8)
    amax = b.op("ReduceMax", b.op("Abs", xf), axes, keepdims=1)
    s_signed = b.op("Max", b.op("Div", amax, fmax), eps)
    lo = b.op("ReduceMin", xf, axes, keepdims=1)
    hi = b.op("ReduceMax", xf, axes, keepdims=1)
    s_unsigned = b.op("Max", b.op("Div", b.op("Sub", hi, lo), fmax), eps)
    scale = b.op("Where", signed_b, s_signed, s_unsigned)
    zero_point = b.op("Where", signed_b, b.op("Mul", lo, b.const(0.0)), lo)
    return scale, zero_point


def _fmax(b: _Body, f: _FormatTensors) -> str:
    """Largest finite value of the format as a float32 scalar (the largest over channels; dynamic
    mode is per-tensor-format, so there is only one)."""
    return b.reduce_all("ReduceMax", _decode_formula(b, f.max_code, f))


def _by_channel(b: _Body, x: str, rows: str) -> tuple[str, str]:
    """x reshaped to [rows, -1] (rows = 1 or x.shape[0]) and x's original shape."""
    shape = b.op("Shape", x)
    target = b.op("Concat", b.op("Reshape", rows, b.const([1], np.int64)),
                  b.const([-1], np.int64), axis=0)
    return b.op("Reshape", x, target), shape


def _node_format(b: _Body) -> tuple[str, str, str, str, str, str]:
    """Format tensors from the node attributes: (signed, ebits, mbits, bias, bits [Cb,1], Cb)."""
    signed = b.f32(b.ref("signed", "int"))
    ebits = b.f32(b.ref("ebits", "int"))
    mbits = b.f32(b.ref("mbits", "int"))
    bias = b.f32(b.ref("bias", "int"))
    bits = b.f32(b.ref("channel_bits", "ints"))
    rows = b.op("Size", bits)
    bits = b.op("Unsqueeze", bits, b.const([1], np.int64))  # [Cb, 1]
    return signed, ebits, mbits, bias, bits, rows


_FORMAT_ATTRS = ("signed", "ebits", "mbits", "bias", "channel_bits")


def quantize_fp_function(opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """``QuantizeFP(x, scale, zero_point) -> (codes int8, scale_used, zero_point_used)``.

    ``codes`` holds each code's byte as INT8 (codes 128..255 read as negative numbers; view the
    tensor as uint8 to get the code): TensorRT accepts no UINT8 intermediate tensor.

    Static: ``u = (x - z) / s`` with ``z`` used only by unsigned formats; scale and
    zero point broadcast against x (numpy rules; per-channel weight scales are
    [C, 1, ...]). Dynamic (attribute ``dynamic=1``): per token, along ``axis``,
    as :meth:`exporter.quantizers.ActQuantizer.dynamic_params`; the inputs scale
    and zero_point are then ignored. Outputs 1 and 2 are what DequantizeFP needs.
    """
    b = _Body("q")
    signed, ebits, mbits, bias, bits, rows = _node_format(b)
    f = _format_tensors(b, signed, ebits, mbits, bias, bits)
    xf = b.f32("x")
    s_static = b.f32("scale")
    z_static = b.op("Mul", b.f32("zero_point"), b.op("Sub", b.const(1.0), signed))
    dynamic = b.op("Cast", b.ref("dynamic", "int"), to=TensorProto.BOOL)
    # If on a constant condition: static nodes carry no per-token reductions (TensorRT and ORT
    # keep only the taken branch)
    dyn = _Body("qdyn")
    dyn.nodes, dyn._n = [], 0
    s_dyn, z_dyn = _dynamic_params(dyn, xf, dyn.ref("axes", "ints"), f.signed, _fmax(dyn, f))
    then_graph = helper.make_graph(dyn.nodes, "dynamic", [], [
        helper.make_tensor_value_info(s_dyn, TensorProto.FLOAT, None),
        helper.make_tensor_value_info(z_dyn, TensorProto.FLOAT, None)])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", [s_static], ["qstat_s"]),
         helper.make_node("Identity", [z_static], ["qstat_z"])], "static", [], [
            helper.make_tensor_value_info("qstat_s", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("qstat_z", TensorProto.FLOAT, None)])
    scale, zero_point = b.op("If", dynamic, outputs=2, then_branch=then_graph,
                             else_branch=else_graph)
    # true division, not a reciprocal multiply: codes must match PyTorch's (x - z) / s
    u = b.op("Div", b.op("Sub", xf, zero_point), scale)
    u2, shape = _by_channel(b, u, rows)
    codes = _encode(b, u2, f)
    codes = b.op("Reshape", codes, shape)
    # INT8 holding the code byte (c >= 128 reads as c - 256): TensorRT has no UINT8 intermediates
    wrapped = b.op("Sub", codes, b.op("Mul", b.f32(b.op("GreaterOrEqual", codes, b.const(128.0))),
                                      b.const(256.0)))
    b.nodes.append(helper.make_node("Cast", [wrapped], ["codes"], to=TensorProto.INT8))
    b.nodes.append(helper.make_node("Identity", [scale], ["scale_used"]))
    b.nodes.append(helper.make_node("Identity", [zero_point], ["zero_point_used"]))
    return helper.make_function(
        DOMAIN, "QuantizeFP", ["x", "scale", "zero_point"],
        ["codes", "scale_used", "zero_point_used"], b.nodes, [helper.make_opsetid("", opset)],
        attributes=list(_FORMAT_ATTRS) + ["axes", "dynamic"],
        doc_string="Encode x to minifloat codes (exporter.formats semantics). See docs/onnx_ops.md.",
    )


def dequantize_fp_function(opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """``DequantizeFP(codes, scale, zero_point) -> y = z + s * table[code]`` (z only unsigned).

    ``table`` holds one row of ``2**max(channel_bits)`` values per width from
    ``min(channel_bits)`` to ``max(channel_bits)`` (row i: the format at width
    min + i, ``Format.table`` zero-padded); y is cast to ``output_dtype``.
    """
    b = _Body("d")
    signed, _, _, _, bits, rows = _node_format(b)
    table = b.ref("table", "floats")
    lo_bits = b.reduce_all("ReduceMin", bits)
    row_len = b.op("Div", b.op("Size", table),
                   b.op("Add", b.op("Sub", b.i64(b.reduce_all("ReduceMax", bits)),
                                    b.i64(lo_bits)), b.const(1, np.int64)))
    offset = b.op("Mul", b.i64(b.op("Sub", bits, lo_bits)), row_len)  # [Cb, 1]
    c32 = b.op("Cast", "codes", to=TensorProto.INT32)
    c32 = b.op("Where", b.op("Less", c32, b.const(0, np.int32)),
               b.op("Add", c32, b.const(256, np.int32)), c32)  # the code byte, 0..255
    c2, shape = _by_channel(b, c32, rows)
    idx = b.op("Add", b.i64(c2), offset)
    vals = b.op("Reshape", b.op("Gather", table, idx), shape)
    z = b.op("Mul", b.f32("zero_point"), b.op("Sub", b.const(1.0), signed))
    y = b.op("Add", z, b.op("Mul", b.f32("scale"), vals))
    b.nodes.append(helper.make_node("Cast", [y], ["y"]))
    b.nodes[-1].attribute.append(_ref_attr("to", "output_dtype", onnx.AttributeProto.INT))
    return helper.make_function(
        DOMAIN, "DequantizeFP", ["codes", "scale", "zero_point"], ["y"], b.nodes,
        [helper.make_opsetid("", opset)], attributes=list(_FORMAT_ATTRS) + ["table", "output_dtype"],
        doc_string="Decode minifloat codes by table (Format.table). See docs/onnx_ops.md.",
    )


def _ref_attr(name: str, ref: str, type_) -> onnx.AttributeProto:
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, type_
    return a


# ---------------------------------------------------------------------------------------------
# Node builders
# ---------------------------------------------------------------------------------------------
def _format_attrs(fmt: Format, channel_bits: Sequence[int] | None) -> dict:
    _check_supported(fmt)
    bits = [fmt.bits] if channel_bits is None else [int(v) for v in channel_bits]
    if not bits:
        raise ValueError("channel_bits must not be empty")
    for w in sorted(set(bits)):
        _check_supported(with_bits(fmt, w))
    return dict(signed=int(fmt.signed), ebits=fmt.ebits, mbits=fmt.mbits, bias=fmt.bias,
                channel_bits=bits)


def dequant_table(fmt: Format, channel_bits: Sequence[int] | None = None) -> np.ndarray:
    """The ``table`` attribute of DequantizeFP: one Format.table row per width, zero-padded."""
    bits = [fmt.bits] if channel_bits is None else sorted(set(int(v) for v in channel_bits))
    lo, hi = min(bits), max(bits)
    table = np.zeros((hi - lo + 1, 1 << hi), np.float32)
    for w in range(lo, hi + 1):
        t = with_bits(fmt, w).table
        table[w - lo, : t.size] = t
    return table.reshape(-1)


def make_quantize_node(inputs: Sequence[str], outputs: Sequence[str], fmt: Format | str, *,
                       channel_bits: Sequence[int] | None = None, axis: int = -1,
                       dynamic: bool = False, name: str | None = None) -> onnx.NodeProto:
    """A QuantizeFP node. ``outputs``: codes[, scale_used, zero_point_used]."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    return helper.make_node("QuantizeFP", list(inputs), list(outputs), name=name, domain=DOMAIN,
                            axes=[int(axis)], dynamic=int(bool(dynamic)),
                            **_format_attrs(fmt, channel_bits))


def make_dequantize_node(inputs: Sequence[str], outputs: Sequence[str], fmt: Format | str, *,
                         channel_bits: Sequence[int] | None = None,
                         output_dtype: int = TensorProto.FLOAT,
                         name: str | None = None) -> onnx.NodeProto:
    """A DequantizeFP node (decode table from ``exporter.formats``)."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    return helper.make_node("DequantizeFP", list(inputs), list(outputs), name=name, domain=DOMAIN,
                            table=dequant_table(fmt, channel_bits).tolist(),
                            output_dtype=int(output_dtype), **_format_attrs(fmt, channel_bits))


def node_format(node: onnx.NodeProto) -> tuple[Format, list[int]]:
    """(base format, channel_bits) of a QuantizeFP / DequantizeFP node (for graph passes)."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    prefix = "" if a["signed"] else "u"
    fmt = get_format(f"{prefix}e{a['ebits']}m{a['mbits']}")
    if fmt.bias != a["bias"]:
        raise ValueError(f"node {node.name!r}: bias {a['bias']} is not the default of {fmt.name}")
    return fmt, list(a["channel_bits"])


# ---------------------------------------------------------------------------------------------
# FP4Gemm (docs/fp4gemm_contract.md)
# ---------------------------------------------------------------------------------------------
FP4GEMM_INPUTS = ("X", "W", "w_scale", "w_lut", "a_scale", "a_zero", "bias", "perm", "adapter")
FP4GEMM_ATTRS = ("in_features", "out_features", "group_bits", "group_sizes", "a_signed", "a_ebits",
                 "a_mbits", "a_bias", "a_max_code", "a_mode", "plugin_namespace", "plugin_version")


def fp4gemm_function(opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """The exact reference body of ``FP4Gemm`` (docs/fp4gemm_contract.md), standard ops only."""
    b = _Body("g")
    i64 = np.int64
    zero, one = b.const(0.0), b.const(1.0)
    K = b.ref("in_features", "int")
    N = b.ref("out_features", "int")
    gbits = b.ref("group_bits", "ints")
    gsizes = b.ref("group_sizes", "ints")
    # ---- weights: unpack the LSB-first bit stream of every grouped row ----
    rows = b.op("Range", b.const(0, i64), N, b.const(1, i64))  # [N]
    ends = b.op("CumSum", gsizes, b.const(0, i64))  # [G]
    grp = b.op("ReduceSum", b.i64(b.op("GreaterOrEqual", b.op("Unsqueeze", rows, b.const([1], i64)),
                                       b.op("Unsqueeze", ends, b.const([0], i64)))),
               b.const([1], i64), keepdims=0)  # [N] group of each row
    rbits = b.op("Gather", gbits, grp)  # [N]
    row_bytes = b.op("Div", b.op("Add", b.op("Mul", K, rbits), b.const(7, i64)), b.const(8, i64))
    start = b.op("CumSum", row_bytes, b.const(0, i64), exclusive=1)  # [N]
    kk = b.op("Range", b.const(0, i64), K, b.const(1, i64))  # [K]
    col = b.op("Unsqueeze", rbits, b.const([1], i64))
    pos = b.op("Add", b.op("Mul", b.op("Unsqueeze", start, b.const([1], i64)), b.const(8, i64)),
               b.op("Mul", b.op("Unsqueeze", kk, b.const([0], i64)), col))  # [N, K] bit positions
    byte = b.op("Div", pos, b.const(8, i64))
    shift = b.op("Mod", pos, b.const(8, i64))
    w_sel = b.op("Gather", "W", "adapter", axis=0)  # [B] int8
    w_u = b.op("Mod", b.op("Add", b.op("Cast", w_sel, to=TensorProto.INT32),
                           b.const(256, np.int32)), b.const(256, np.int32))
    w_u = b.op("Concat", w_u, b.const([0], np.int32), axis=0)  # a code may reach one byte further
    pair = b.op("Add", b.op("Gather", w_u, byte),
                b.op("Mul", b.op("Gather", w_u, b.op("Add", byte, b.const(1, i64))),
                     b.const(256, np.int32)))
    pow2i = b.const([1 << i for i in range(10)], np.int32)
    codes = b.op("Mod", b.op("Div", pair, b.op("Gather", pow2i, shift)),
                 b.op("Gather", pow2i, col))  # [N, K]
    lut_idx = b.op("Add", b.op("Mul", b.op("Unsqueeze", grp, b.const([1], i64)), b.const(256, i64)),
                   b.i64(codes))
    w_vals = b.op("Gather", b.op("Reshape", "w_lut", b.const([-1], i64)), lut_idx)
    wq = b.op("Mul", w_vals, b.op("Unsqueeze", b.f32("w_scale"), b.const([1], i64)))  # [N, K]
    # ---- activations ----
    xf = b.f32("X")
    signed = b.f32(b.ref("a_signed", "int"))
    ebits = b.f32(b.ref("a_ebits", "int"))
    mbits = b.f32(b.ref("a_mbits", "int"))
    abias = b.f32(b.ref("a_bias", "int"))
    active = b.op("Greater", ebits, zero)
    ebits_safe = b.op("Max", ebits, one)  # W4A16 nodes carry a_ebits = 0: keep the math finite
    bits = b.op("Add", b.op("Add", signed, ebits_safe), mbits)
    f = _format_tensors(b, signed, ebits_safe, mbits, abias, bits)
    f.max_code = b.f32(b.ref("a_max_code", "int"))
    dynamic = b.op("Cast", b.ref("a_mode", "int"), to=TensorProto.BOOL)
    s_dyn, z_dyn = _dynamic_params(b, xf, b.const([-1], i64), f.signed,
                                   _decode_formula(b, f.max_code, f))
    z_static = b.op("Mul", b.f32("a_zero"), b.op("Sub", one, signed))
    scale = b.op("Where", dynamic, s_dyn, b.f32("a_scale"))
    zp = b.op("Where", dynamic, z_dyn, z_static)
    u = b.op("Div", b.op("Sub", xf, zp), scale)
    xq = b.op("Add", zp, b.op("Mul", scale, _decode_formula(b, _encode(b, u, f), f)))
    xq = b.op("Where", active, xq, xf)
    # ---- GEMM, bias, output permutation ----
    yg = b.op("Add", b.op("MatMul", xq, b.op("Transpose", wq, perm=[1, 0])), b.f32("bias"))
    inv = b.op("ScatterElements", b.op("Mul", rows, b.const(0, i64)),
               b.i64("perm"), rows, axis=0)  # inv[perm[j]] = j
    y = b.op("Gather", yg, inv, axis=-1)
    b.nodes.append(helper.make_node("CastLike", [y, "X"], ["Y"]))
    return helper.make_function(
        DOMAIN, "FP4Gemm", list(FP4GEMM_INPUTS), ["Y"], b.nodes, [helper.make_opsetid("", opset)],
        attributes=list(FP4GEMM_ATTRS),
        doc_string="Packed-weight minifloat GEMM; see docs/onnx_ops.md (FP4Gemm contract).",
    )


def fp4gemm_attrs(in_features: int, out_features: int, group_bits: Sequence[int],
                  group_sizes: Sequence[int], a_fmt: Format | str | None, a_mode: str = "static"
                  ) -> dict:
    """Attribute dict of an FP4Gemm node; ``a_fmt=None`` means activations stay float (W4A16)."""
    if sum(group_sizes) != out_features or len(group_bits) != len(group_sizes):
        raise ValueError(f"group_sizes {list(group_sizes)} must sum to out_features={out_features} "
                         f"and match group_bits {list(group_bits)}")
    if a_mode not in ("static", "dynamic"):
        raise ValueError(f"a_mode must be 'static' or 'dynamic', got {a_mode!r}")
    attrs = dict(in_features=int(in_features), out_features=int(out_features),
                 group_bits=[int(v) for v in group_bits], group_sizes=[int(v) for v in group_sizes],
                 a_signed=1, a_ebits=0, a_mbits=0, a_bias=0, a_max_code=0,
                 a_mode=int(a_mode == "dynamic"), plugin_namespace=DOMAIN, plugin_version="1")
    if a_fmt is not None:
        fmt = get_format(a_fmt) if isinstance(a_fmt, str) else a_fmt
        _check_supported(fmt)
        attrs.update(a_signed=int(fmt.signed), a_ebits=fmt.ebits, a_mbits=fmt.mbits,
                     a_bias=fmt.bias, a_max_code=fmt.max_code_mag)
    return attrs


def make_fp4gemm_node(inputs: Sequence[str], output: str, attrs: dict,
                      name: str | None = None) -> onnx.NodeProto:
    """An FP4Gemm node; ``inputs`` are the nine names of FP4GEMM_INPUTS, ``attrs`` from fp4gemm_attrs."""
    if len(inputs) != len(FP4GEMM_INPUTS):
        raise ValueError(f"FP4Gemm takes {len(FP4GEMM_INPUTS)} inputs {FP4GEMM_INPUTS}, got {len(inputs)}")
    return helper.make_node("FP4Gemm", list(inputs), [output], name=name, domain=DOMAIN, **attrs)


def fp4gemm_model(weights: dict[str, np.ndarray], attrs: dict, x_dtype=np.float32, x_rank: int = 3,
                  opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A one-node model: graph inputs ``X`` [d0, .., K] (rank ``x_rank``) and ``adapter`` (int64
    scalar); the other seven FP4Gemm inputs are initializers from ``weights`` (FP4GEMM_INPUTS keys)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype))
    lead = [f"d{i}" for i in range(x_rank - 1)]
    inits = [numpy_helper.from_array(np.asarray(weights[k]), k) for k in FP4GEMM_INPUTS[1:-1]]
    graph = helper.make_graph(
        [make_fp4gemm_node(FP4GEMM_INPUTS, "Y", attrs, name="fp4gemm")], "fp4gemm",
        [helper.make_tensor_value_info("X", elem, lead + [attrs["in_features"]]),
         helper.make_tensor_value_info("adapter", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("Y", elem, lead + [attrs["out_features"]])], inits)
    return make_model(graph, opset, functions=[fp4gemm_function(opset)])


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def all_functions(opset: int = DEFAULT_OPSET) -> list[onnx.FunctionProto]:
    return [quantize_fp_function(opset), dequantize_fp_function(opset), fp4gemm_function(opset)]


def functions_for(graph: onnx.GraphProto, opset: int = DEFAULT_OPSET) -> list[onnx.FunctionProto]:
    """The function bodies of the ops of our domain that ``graph`` uses (sorted by name)."""
    used = {n.op_type for n in graph.node if n.domain == DOMAIN}
    builders = {"QuantizeFP": quantize_fp_function, "DequantizeFP": dequantize_fp_function,
                "FP4Gemm": fp4gemm_function}
    unknown = used - builders.keys()
    if unknown:
        raise ValueError(f"graph uses unknown {DOMAIN} ops: {sorted(unknown)}")
    return [builders[name](opset) for name in sorted(used)]


def make_model(graph: onnx.GraphProto, opset: int = DEFAULT_OPSET,
               functions: Sequence[onnx.FunctionProto] | None = None) -> onnx.ModelProto:
    """A model around ``graph`` importing our domain and carrying its function bodies."""
    funcs = list(functions) if functions is not None else functions_for(graph, opset)
    model = helper.make_model(graph, opset_imports=opset_imports(opset), functions=funcs,
                              producer_name="export-engine")
    model.ir_version = 10
    return model


def qdq_model(fmt: Format | str, x_shape: Sequence[int | str | None], *,
              channel_bits: Sequence[int] | None = None, axis: int = -1, dynamic: bool = False,
              scale: np.ndarray | float = 1.0, zero_point: np.ndarray | float = 0.0,
              x_dtype=np.float32, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """x -> QuantizeFP -> DequantizeFP -> y, plus the codes (INT8 bytes) as a second output."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype))
    inits = [numpy_helper.from_array(np.asarray(scale, np.float32), "scale"),
             numpy_helper.from_array(np.asarray(zero_point, np.float32), "zero_point")]
    nodes = [
        make_quantize_node(["x", "scale", "zero_point"], ["codes", "s_used", "z_used"], fmt,
                           channel_bits=channel_bits, axis=axis, dynamic=dynamic, name="q"),
        make_dequantize_node(["codes", "s_used", "z_used"], ["y"], fmt, channel_bits=channel_bits,
                             output_dtype=elem, name="dq"),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", elem, list(x_shape))],
        [helper.make_tensor_value_info("y", elem, list(x_shape)),
         helper.make_tensor_value_info("codes", TensorProto.INT8, list(x_shape))], inits)
    return make_model(graph, opset)
