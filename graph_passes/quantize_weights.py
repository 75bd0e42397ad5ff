"""quantize_weights: fold each weight QuantizeFP into a code initializer; DequantizeFP stays.

Codes are stored as INT8 initializers holding each code's byte (view as uint8 for the code) behind
a standard ``DequantizeLinear(codes, 1.0)`` and a Cast back to INT8 (exact: the values are
integers): TensorRT accepts an INT8 constant only in front of a DequantizeLinear (or a plugin), and
no UINT8 tensors. DequantizeFP reads a negative value c as the byte c + 256.

Codes are computed with :mod:`exporter.formats` (the definition the QuantizeFP body reproduces):
``u = (W - z) / s`` in float32 (z for unsigned formats only), each output channel encoded with
its own width (``channel_bits``). TALoRA weight stacks ``[A, out, ...]`` are encoded per adapter
and selected by the same ``Gather(stack, adapter_index)``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from exporter.formats import Format, with_bits

from .framework import PassContext
from .patterns import constant_value, find_quant_layers, node_attrs_format, producer

#: weight elements per encoding task (a few MB of float32 temporaries per thread)
_BLOCK_ELEMENTS = 1 << 19


def encode_weight(w: np.ndarray, fmt: Format, channel_bits: list[int], scale: np.ndarray,
                  zero_point: np.ndarray) -> np.ndarray:
    """uint8 codes of one weight [out, ...]; ``scale`` broadcasts against w (e.g. [out, 1, ...]).

    Row blocks are encoded on every core: numpy releases the GIL inside its array loops, and
    encoding a UNet's 2.5 G weights is the passes' longest step."""
    bits = np.asarray(channel_bits if len(channel_bits) > 1 else channel_bits * w.shape[0])
    codes = np.empty(w.shape, np.uint8)

    def rows(block: slice) -> None:
        def part(a):  # the block's rows of a per-channel array; a broadcast one as it is
            return a[block] if a.ndim and a.shape[0] == w.shape[0] else a

        x = w[block].astype(np.float32)
        if not fmt.signed:
            x = x - part(zero_point).astype(np.float32)
        u = (x / part(scale).astype(np.float32)).astype(np.float32)
        u = u.reshape(u.shape[0], -1)
        out = codes[block].reshape(u.shape)  # a view: codes is contiguous
        for b in np.unique(bits[block]):
            sel = bits[block] == b
            out[sel] = with_bits(fmt, int(b)).encode(u[sel], nan="zero")

    per_row = max(1, int(np.prod(w.shape[1:])))
    step = max(1, _BLOCK_ELEMENTS // per_row)
    blocks = [slice(i, i + step) for i in range(0, w.shape[0], step)]
    if len(blocks) == 1:
        rows(blocks[0])
    else:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(rows, blocks))
    return codes


def _weight_source(t: gs.Tensor):
    """(values [A?, ...], gather node or None) of a folded weight."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values), None
    node = producer(t)
    if node is not None and node.op == "Gather" and isinstance(node.inputs[0], gs.Constant):
        return np.asarray(node.inputs[0].values), node
    return None, None


def code_tensor(graph: gs.Graph, name: str, codes: np.ndarray, index: gs.Tensor | None = None
                ) -> gs.Variable:
    """Codes (uint8, with a leading adapter axis when ``index`` is given) as DequantizeFP's INT8
    input: INT8 initializer -> DequantizeLinear(1.0) [-> Gather(., index)] -> Cast(INT8)."""
    const = gs.Constant(name, np.ascontiguousarray(codes).view(np.int8))
    t = gs.Variable(name + "_f", dtype=np.float32, shape=list(codes.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", name + "/as_float", {},
                               [const, gs.Constant(name + ".unit_scale", np.array(1.0, np.float32))], [t]))
    shape = list(codes.shape)
    if index is not None:
        shape = shape[1:]
        selected = gs.Variable(name + "_selected", dtype=np.float32, shape=shape)
        graph.nodes.append(gs.Node("Gather", name + "/select_adapter", {"axis": 0}, [t, index], [selected]))
        t = selected
    as_int8 = gs.Variable(name + "_i8", dtype=np.int8, shape=shape)
    graph.nodes.append(gs.Node("Cast", name + "/as_int8", {"to": onnx.TensorProto.INT8}, [t], [as_int8]))
    return as_int8


def read_codes(t: gs.Tensor) -> tuple[np.ndarray | None, gs.Tensor | None, gs.Constant | None]:
    """(uint8 codes with a leading adapter axis, adapter index or None, the INT8 initializer)
    of a tensor made by :func:`code_tensor`; Nones for anything else."""
    node, index = producer(t), None
    if node is not None and node.op == "Cast":
        node = producer(node.inputs[0])
    if node is not None and node.op == "Gather":
        index, node = node.inputs[1], producer(node.inputs[0])
    if node is None or node.op != "DequantizeLinear" or not isinstance(node.inputs[0], gs.Constant):
        return None, None, None
    const = node.inputs[0]
    codes = np.asarray(const.values).view(np.uint8)
    return (codes if index is not None else codes[None]), index, const


def quantize_weights(graph: gs.Graph, ctx: PassContext) -> dict:
    done, skipped = 0, []
    for layer in find_quant_layers(graph):
        if layer.w_q is None:
            continue
        values, gather = _weight_source(layer.weight_input)
        scale = constant_value(graph, layer.w_q.inputs[1])
        zero = constant_value(graph, layer.w_q.inputs[2])
        if values is None or scale is None or zero is None or layer.w_q.attrs.get("dynamic", 0):
            skipped.append(layer.name)  # fold_lora must run first
            continue
        fmt, bits = node_attrs_format(layer.w_q)
        if gather is None:
            codes = encode_weight(values, fmt, bits, scale, zero)
            layer.w_dq.inputs[0] = code_tensor(graph, f"{layer.name}.weight_codes", codes)
        else:
            codes = np.stack([encode_weight(v, fmt, bits, scale, zero) for v in values])
            layer.w_dq.inputs[0] = code_tensor(graph, f"{layer.name}.weight_codes_per_adapter", codes,
                                               gather.inputs[1])
        layer.w_dq.inputs[1] = gs.Constant(f"{layer.name}.weight_scale", scale.astype(np.float32))
        layer.w_dq.inputs[2] = gs.Constant(f"{layer.name}.weight_zero_point", zero.astype(np.float32))
        layer.w_q.outputs.clear()
        done += 1
    if skipped:
        raise ValueError(f"quantize_weights: {len(skipped)} weight quantizers are not constant "
                         f"(first: {skipped[0]}); run fold_lora first")
    return {"quantized": done} if done else {}
