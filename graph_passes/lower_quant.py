"""lower_quant: our QuantizeFP/DequantizeFP nodes as a few standard ops, specialised per node.

The op bodies (exporter/onnx_ops.py) are generic: one function serves every format, so each body
derives the format's exponent range, powers of two and sign handling from attributes at run time
(about 140 ops for QuantizeFP and 50 for DequantizeFP once inlined). A UNet holds hundreds of
pairs, so the inlined graph has ~100 k nodes: ONNX Runtime takes minutes to load it and TensorRT
far longer to build it. Here every node's format is known, so the same arithmetic needs only the
ops that format uses:

* **activation pairs** ``x -> QuantizeFP -> DequantizeFP`` become, in float32,
  ``u = (x - z) / s`` (z: the body's zero point, a signed zero for signed formats);
  ``a = |u|`` (unsigned: ``relu(u)``);
  ``step = 2**(clamp(floor(log2 a), emin, emax) - m)`` by one comparison per binade;
  ``v = min(round_half_even(a / step) * step, max)``; the sign back (``u < 0 or 1/u < 0``, as the
  body); NaN as the format encodes it; ``y = z + s * v``. This is the encode of docs/onnx_ops.md
  followed by the table decode, term by term: ``a / step`` and ``r * step`` are exact (powers of
  two), ``Round`` is half-to-even, and the largest code's value is ``max``. When the graph reads the
  codes too (debug exports), they are ``k * 2**m + round(a / step)`` in binade k, clamped, with the
  sign bit, as INT8 bytes. Dynamic (per-token) pairs keep the body's reductions, op for op.
* **weight dequantization** (codes made by ``quantize_weights``):
  ``fold`` (the reference target): the decoded weight becomes a float constant, computed in numpy
  with the body's float32 arithmetic (``z' + s * table[code]``, then the output cast; each product
  and sum is one IEEE rounding in both), so TensorRT sees plain weights;
  ``decode`` (the other targets, which keep no float copy): one Gather from a per-layer value table
  indexed by the code byte, then ``* s + z'``.

Tests (tests/test_lower_quant.py) run every format, static and dynamic, fp16 and fp32, through
both forms in ONNX Runtime on every rounding midpoint and its neighbours and require equal outputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.helper import tensor_dtype_to_np_dtype

from exporter.formats import Format, with_bits

from .framework import PassContext
from .patterns import constant_value, is_op, node_attrs_format, producer
from .quantize_weights import read_codes

_EPS = np.float32(1e-8)  # the dynamic-scale floor of ActQuantizer.dynamic_params and the body


class _Emitter:
    """Appends standard-op nodes with unique names under one prefix."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix, self.n = graph, prefix, 0

    def op(self, op: str, *inputs, dtype=np.float32, **attrs) -> gs.Variable:
        self.n += 1
        name = f"{self.prefix}/{self.n}_{op}"
        out = gs.Variable(name + "_out", dtype=dtype)
        ins = [t if isinstance(t, gs.Tensor) else self.const(t) for t in inputs]
        self.graph.nodes.append(gs.Node(op, name, attrs, ins, [out]))
        return out

    def const(self, value, dtype=np.float32) -> gs.Constant:
        self.n += 1
        return gs.Constant(f"{self.prefix}/c{self.n}", np.asarray(value, dtype))


def _single_width(node: gs.Node) -> Format | None:
    fmt, bits = node_attrs_format(node)
    return with_bits(fmt, bits[0]) if len(bits) == 1 else None


def _quantize(e: _Emitter, u: gs.Tensor, fmt: Format, want_codes: bool):
    """(decode(encode(u)) as float32, the INT8 code bytes or None) for one format
    (docs/onnx_ops.md, Encode): ``code = k * 2**m + round(a / step)`` in binade k."""
    a = e.op("Abs", u) if fmt.signed else e.op("Relu", u)
    m = fmt.mbits
    step = e.const(np.ldexp(np.float32(1), fmt.emin - m))
    base = e.const(0.0)
    for i, k in enumerate(range(fmt.emin + 1, fmt.emax + 1), 1):  # binade i starts at 2**k
        at_least = e.op("GreaterOrEqual", a, e.const(np.ldexp(np.float32(1), k)), dtype=np.bool_)
        step = e.op("Where", at_least, e.const(np.ldexp(np.float32(1), k - m)), step)
        if want_codes:
            base = e.op("Where", at_least, e.const(float(i << m)), base)
    r = e.op("Round", e.op("Div", a, step))
    v = e.op("Min", e.op("Mul", r, step), e.const(fmt.max))
    if fmt.signed:  # negative: x < 0 or 1/x < 0, so that -0.0 keeps its sign as in the table
        neg = e.op("Or", e.op("Less", u, e.const(0.0), dtype=np.bool_),
                   e.op("Less", e.op("Div", e.const(1.0), u), e.const(0.0), dtype=np.bool_),
                   dtype=np.bool_)
        v = e.op("Where", neg, e.op("Neg", v), v)
    is_nan = e.op("IsNaN", u, dtype=np.bool_)
    v = e.op("Where", is_nan, e.const(np.nan if fmt.nan_code else 0.0), v)  # NaN: code 0 or E4M3's
    if not want_codes:
        return v, None
    code = e.op("Min", e.op("Add", base, r), e.const(float(fmt.max_code_mag)))
    if fmt.signed:
        code = e.op("Add", code, e.op("Where", neg, e.const(float(fmt.sign_mask)), e.const(0.0)))
    code = e.op("Where", is_nan, e.const(float(fmt.max_code_mag + 1 if fmt.nan_code else 0)), code)
    if fmt.bits == 8:  # the byte as INT8: codes 128..255 read as c - 256
        high = e.op("Cast", e.op("GreaterOrEqual", code, e.const(128.0), dtype=np.bool_),
                    to=onnx.TensorProto.FLOAT)
        code = e.op("Sub", code, e.op("Mul", high, e.const(256.0)))
    return v, e.op("Cast", code, to=onnx.TensorProto.INT8, dtype=np.int8)


def dynamic_scale(e: _Emitter, xf: gs.Tensor, fmt: Format, axes: list[int]):
    """(scale, zero point) per token, as the QuantizeFP body computes them (signed formats: the
    zero point is min * 0, a signed zero, which the body subtracts and adds back too)."""
    axes_t = e.const(axes, np.int64)
    fmax = e.const(fmt.max)
    lo = e.op("ReduceMin", xf, axes_t, keepdims=1)
    if fmt.signed:
        amax = e.op("ReduceMax", e.op("Abs", xf), axes_t, keepdims=1)
        return e.op("Max", e.op("Div", amax, fmax), e.const(_EPS)), e.op("Mul", lo, e.const(0.0))
    hi = e.op("ReduceMax", xf, axes_t, keepdims=1)
    return e.op("Max", e.op("Div", e.op("Sub", hi, lo), fmax), e.const(_EPS)), lo


def _as_f32(e: _Emitter, t: gs.Tensor) -> gs.Tensor:
    if isinstance(t, gs.Constant):
        return e.const(np.asarray(t.values, np.float32))
    return t if t.dtype == np.float32 else e.op("Cast", t, to=onnx.TensorProto.FLOAT)


def _same(t: gs.Tensor, *candidates: gs.Tensor) -> bool:
    return any(t is c for c in candidates)


def _lower_activation_pair(graph: gs.Graph, q: gs.Node, dq: gs.Node) -> bool:
    fmt = _single_width(q)
    if fmt is None or _single_width(dq) != fmt:
        return False
    dynamic = bool(q.attrs.get("dynamic", 0))
    x, scale_in, zero_in = q.inputs[:3]
    if any(c is not dq for t in q.outputs[1:] for c in t.outputs) or any(t in graph.outputs
                                                                          for t in q.outputs[1:]):
        return False  # scale_used / zero_point_used read elsewhere: leave the pair generic
    if dynamic:
        if dq.inputs[1] is not q.outputs[1] or (not fmt.signed and dq.inputs[2] is not q.outputs[2]):
            return False
    elif not (_same(dq.inputs[1], scale_in, q.outputs[1])
              and (fmt.signed or _same(dq.inputs[2], zero_in, q.outputs[2]))):
        return False
    codes_out = q.outputs[0]
    want_codes = codes_out in graph.outputs or any(c is not dq for c in codes_out.outputs)
    e = _Emitter(graph, (q.name or codes_out.name) + "/lowered")
    xf = _as_f32(e, x)
    if dynamic:
        s, z = dynamic_scale(e, xf, fmt, [int(a) for a in q.attrs["axes"]])
    else:  # z * (1 - signed), as the body: a signed format's zero point is a signed zero
        s = _as_f32(e, scale_in)
        z = e.const(_zero_term(q, zero_in.values)) if isinstance(zero_in, gs.Constant) else \
            e.op("Mul", _as_f32(e, zero_in), e.const(float(1 - int(q.attrs["signed"]))))
    u = e.op("Div", e.op("Sub", xf, z), s)
    values, codes = _quantize(e, u, fmt, want_codes)
    y = e.op("Add", z, e.op("Mul", s, values))
    out_dtype = int(dq.attrs.get("output_dtype", onnx.TensorProto.FLOAT))
    if out_dtype != onnx.TensorProto.FLOAT:
        y = e.op("Cast", y, to=out_dtype, dtype=tensor_dtype_to_np_dtype(out_dtype))
    _replace(graph, dq.outputs[0], y)
    dq.outputs.clear()
    if codes is not None:  # debug exports read the codes
        _replace(graph, codes_out, codes)
        q.outputs.clear()
    return True


def _replace(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Route the consumers (and a graph output) of ``old`` to ``new``."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    if old in graph.outputs:  # keep the output's name for whoever reads the graph by name
        new.name, old.name = old.name, old.name + "_replaced"
        new.dtype, new.shape = old.dtype, old.shape
        graph.outputs = [new if t is old else t for t in graph.outputs]


def _code_rows(dq: gs.Node, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(table [rows, 2**max_bits] float32, row index per output channel) of a DequantizeFP."""
    _, bits = node_attrs_format(dq)
    table = np.asarray(dq.attrs["table"], np.float32)
    lo, hi = min(bits), max(bits)
    table = table.reshape(hi - lo + 1, 1 << hi)
    rows = np.asarray(bits if len(bits) > 1 else bits * n_channels) - lo
    return table, rows


def _zero_term(dq: gs.Node, zero: np.ndarray) -> np.ndarray:
    """z * (1 - signed) in float32, as the body computes it."""
    return np.asarray(np.asarray(zero, np.float32) * np.float32(1 - int(dq.attrs["signed"])), np.float32)


def decode_weight(codes: np.ndarray, dq: gs.Node, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """DequantizeFP of constant weight codes [out, ...] (uint8) in numpy, float32 like the body,
    then the node's output dtype."""
    table, rows = _code_rows(dq, codes.shape[0])
    row_of = rows.reshape((-1,) + (1,) * (codes.ndim - 1))
    values = table[row_of, codes.astype(np.int64)]
    y = _zero_term(dq, zero.astype(np.float32)) + scale.astype(np.float32) * values
    return y.astype(tensor_dtype_to_np_dtype(int(dq.attrs.get("output_dtype", onnx.TensorProto.FLOAT))))


def _lower_weight(graph: gs.Graph, dq: gs.Node, mode: str) -> bool:
    codes, index, const = read_codes(dq.inputs[0])
    scale, zero = constant_value(graph, dq.inputs[1]), constant_value(graph, dq.inputs[2])
    if codes is None or scale is None or zero is None:
        return False
    name = const.name.removesuffix("_per_adapter").removesuffix("_codes")
    out_np = tensor_dtype_to_np_dtype(int(dq.attrs.get("output_dtype", onnx.TensorProto.FLOAT)))
    e = _Emitter(graph, dq.name or name)
    if mode == "fold":
        stack = np.stack([decode_weight(c, dq, scale, zero) for c in codes])
        if index is None:
            new = gs.Constant(name + ".dequantized", stack[0])
        else:
            new = e.op("Gather", gs.Constant(name + ".dequantized_per_adapter", stack), index,
                       axis=0, dtype=out_np)
    else:
        # value table indexed by (row * 256 + code byte); the codes arrive as the float value of
        # their INT8 byte (-128..127, DequantizeLinear of the initializer), hence the +128 / wrap
        table, rows = _code_rows(dq, codes.shape[1])
        bytes_ = np.arange(256)
        lut = np.zeros((table.shape[0], 256), np.float32)
        width = table.shape[1]
        lut[:, (bytes_ + 128) % 256] = table[:, np.minimum(bytes_, width - 1)] * (bytes_ < width)
        shape = (-1,) + (1,) * (codes.ndim - 2)
        offset = (rows * 256 + 128).astype(np.float32).reshape(shape)
        src = producer(dq.inputs[0])  # the Cast(INT8) of code_tensor; its float input is exact
        codes_f = src.inputs[0] if src is not None and src.op == "Cast" else dq.inputs[0]
        idx = e.op("Cast", e.op("Add", codes_f, offset), to=onnx.TensorProto.INT64, dtype=np.int64)
        values = e.op("Gather", gs.Constant(name + ".value_table", lut.reshape(-1)), idx, axis=0)
        new = e.op("Mul", gs.Constant(name + ".weight_scale_f32", scale.astype(np.float32)), values)
        if int(dq.attrs["signed"]) == 0:
            new = e.op("Add", gs.Constant(name + ".weight_zero_f32", _zero_term(dq, zero)), new)
        if out_np != np.float32:
            new = e.op("Cast", new, to=int(dq.attrs["output_dtype"]), dtype=out_np)
    _replace(graph, dq.outputs[0], new)
    dq.outputs.clear()
    return True


def _lower(graph: gs.Graph, weights: str) -> dict:
    acts = weights_done = 0
    for dq in [n for n in graph.nodes if is_op(n, "DequantizeFP")]:
        q = producer(dq.inputs[0])
        if is_op(q, "QuantizeFP"):
            acts += _lower_activation_pair(graph, q, dq)
        else:
            weights_done += _lower_weight(graph, dq, weights)
    graph.cleanup(remove_unused_graph_inputs=False)
    left = sum(1 for n in graph.nodes if n.op in ("QuantizeFP", "DequantizeFP"))
    changes = {"activation_pairs": acts, {"fold": "weights_folded", "decode": "weights_decoded"}[weights]:
               weights_done}
    if left:
        changes["left_generic"] = left  # lowered by inlining the generic bodies
    return {k: v for k, v in changes.items() if v}


def lower_quant_fold_weights(graph: gs.Graph, ctx: PassContext) -> dict:
    """Reference target: specialised activation fake-quant, weights decoded to float constants."""
    return _lower(graph, "fold")


def lower_quant(graph: gs.Graph, ctx: PassContext) -> dict:
    """Plugin/native targets: specialised activation fake-quant, weights decoded from codes."""
    return _lower(graph, "decode")
