"""pack_mixed_precision: group a Linear layer's output channels by bit width.

For a weight whose ``channel_bits`` are not all equal, the code rows, scales and widths are
reordered so that each width forms one contiguous group (widths ascending, channels in their
original order inside a group), and a ``Gather(axis=0, inverse permutation)`` after the
DequantizeFP restores the layer's channel order, so the graph computes exactly what it did.
``fuse_fp4_gemm`` then packs each group densely (:func:`exporter.packing.pack`, the layouts of
docs/formats.md) and moves the permutation into the GEMM epilogue. The layout is recorded in
``ctx.metadata["layouts"][layer] = {"group_bits", "group_sizes", "perm"}``.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .framework import PassContext
from .patterns import GEMM_OPS, find_quant_layers
from .quantize_weights import read_codes


def group_layout(channel_bits: list[int], rows: int) -> tuple[np.ndarray, list[int], list[int]]:
    """(perm, group_bits, group_sizes): grouped row j is channel perm[j]."""
    bits = np.asarray(channel_bits if len(channel_bits) > 1 else channel_bits * rows)
    perm = np.argsort(bits, kind="stable")
    group_bits, group_sizes = np.unique(bits, return_counts=True)
    return perm, [int(b) for b in group_bits], [int(n) for n in group_sizes]


def pack_mixed_precision(graph: gs.Graph, ctx: PassContext) -> dict:
    layouts = ctx.metadata.setdefault("layouts", {})
    grouped = 0
    for layer in find_quant_layers(graph):
        bits = [int(b) for b in layer.w_dq.attrs["channel_bits"]]
        if layer.op.op not in GEMM_OPS or len(set(bits)) < 2:
            continue
        scale = layer.w_dq.inputs[1]
        _, index, const = read_codes(layer.w_dq.inputs[0])
        if const is None or not isinstance(scale, gs.Constant):
            raise ValueError(f"pack_mixed_precision: layer {layer.name} is not quantized yet; "
                             "run quantize_weights first")
        perm, group_bits, group_sizes = group_layout(bits, len(bits))
        const.values = np.ascontiguousarray(np.take(const.values, perm, axis=0 if index is None else 1))
        sv = np.asarray(scale.values)
        layer.w_dq.inputs[1] = gs.Constant(f"{layer.name}.weight_scale_grouped",
                                           np.ascontiguousarray(sv[perm] if sv.ndim else sv))
        layer.w_dq.attrs["channel_bits"] = [bits[i] for i in perm]
        restored = layer.w_dq.outputs[0]  # consumers keep reading the restored order
        grouped_out = gs.Variable(f"{layer.name}.weight_dequantized_grouped", dtype=restored.dtype)
        layer.w_dq.outputs[0] = grouped_out
        inverse = np.argsort(perm).astype(np.int64)
        graph.nodes.append(gs.Node("Gather", f"{layer.name}/restore_channel_order", {"axis": 0},
                                   [grouped_out, gs.Constant(f"{layer.name}.channel_order", inverse)],
                                   [restored]))
        layouts[layer.name] = {"group_bits": group_bits, "group_sizes": group_sizes,
                               "perm": perm.tolist()}
        grouped += 1
    return {"mixed_precision_layers": grouped} if grouped else {}
