"""Pattern matching on the exported graph: quantized layers, found by structure, not by names.

A quantized layer in the export (docs/export.md) is::

    x -> QuantizeFP -> DequantizeFP ---------------------------------------> MatMul | Gemm | Conv
    W (+ LoRA / TALoRA subgraph) -> QuantizeFP -> DequantizeFP [-> Gather] [-> Transpose] --^

The weight quantizer is the QuantizeFP whose DequantizeFP reaches input 1 (the weight) of the
GEMM or convolution; the activation quantizer is the pair on input 0. Names are only used to label
layers (reports, user LoRA keys): the weight initializer's name (``<layer>.weight``) when the weight
path starts at one, else the node name.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from exporter.onnx_ops import DOMAIN

GEMM_OPS = ("MatMul", "Gemm")
LAYER_OPS = GEMM_OPS + ("Conv",)
#: ops allowed between the weight DequantizeFP and the GEMM (layout only, no arithmetic)
_WEIGHT_LAYOUT_OPS = ("Transpose", "Gather")


def is_op(node: gs.Node | None, op: str) -> bool:
    return node is not None and node.op == op and (op not in ("QuantizeFP", "DequantizeFP", "FP4Gemm")
                                                    or node.domain == DOMAIN)


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if t.inputs else None


def single_consumer(t: gs.Tensor) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 else None


@dataclass
class QuantLayer:
    """One matched quantized layer. ``layout`` nodes sit between ``w_dq`` and ``op``."""

    name: str
    op: gs.Node
    w_q: gs.Node
    w_dq: gs.Node
    a_q: gs.Node | None
    a_dq: gs.Node | None
    layout: list[gs.Node]

    @property
    def kind(self) -> str:
        return "conv" if self.op.op == "Conv" else "linear"

    @property
    def weight_input(self) -> gs.Tensor:
        """The float weight (possibly computed) that the weight QuantizeFP quantizes."""
        return self.w_q.inputs[0]

    def bias_add(self) -> tuple[gs.Node | None, gs.Constant | None]:
        """(Add node, bias constant) following a MatMul, or (None, Gemm's bias) for Gemm."""
        if self.op.op == "Gemm":
            return None, (self.op.inputs[2] if len(self.op.inputs) > 2 else None)
        if self.op.op != "MatMul":
            return None, None
        nxt = single_consumer(self.op.outputs[0])
        if is_op(nxt, "Add"):
            other = [t for t in nxt.inputs if t is not self.op.outputs[0]]
            if len(other) == 1 and isinstance(other[0], gs.Constant) and other[0].values.ndim == 1:
                return nxt, other[0]
        return None, None


def _weight_leaf_name(t: gs.Tensor, depth: int = 0) -> str | None:
    """Name of the ``*.weight`` initializer the weight path starts from, if any."""
    if isinstance(t, gs.Constant):
        return t.name if t.name.endswith(".weight") else None
    node = producer(t)
    if node is None or depth > 6:
        return None
    for i in node.inputs:
        name = _weight_leaf_name(i, depth + 1)
        if name:
            return name
    return None


def layer_name(w_q: gs.Node) -> str:
    leaf = _weight_leaf_name(w_q.inputs[0])
    if leaf:
        return leaf[: -len(".weight")]
    return w_q.name.split(".w_quant")[0] if ".w_quant" in w_q.name else w_q.name


def _trace_weight_use(dq: gs.Node) -> tuple[gs.Node | None, list[gs.Node]]:
    """Follow the weight DequantizeFP through layout ops to a GEMM/Conv weight input."""
    layout, t = [], dq.outputs[0]
    while True:
        nxt = single_consumer(t)
        if nxt is None:
            return None, []
        if nxt.op in LAYER_OPS and len(nxt.inputs) > 1 and nxt.inputs[1] is t:
            return nxt, layout
        if nxt.op in _WEIGHT_LAYOUT_OPS and nxt.inputs[0] is t:
            layout.append(nxt)
            t = nxt.outputs[0]
            continue
        return None, []


def find_quant_layers(graph: gs.Graph) -> list[QuantLayer]:
    """Every quantized layer of the graph, in graph order."""
    layers = []
    for dq in graph.nodes:
        if not is_op(dq, "DequantizeFP"):
            continue
        q = producer(dq.inputs[0])
        op, layout = _trace_weight_use(dq)
        if op is None:
            continue
        a_dq = producer(op.inputs[0])
        a_q = producer(a_dq.inputs[0]) if is_op(a_dq, "DequantizeFP") else None
        if not is_op(a_dq, "DequantizeFP"):
            a_dq = None
        name = layer_name(q) if is_op(q, "QuantizeFP") else dq.name.split(".w_quant")[0]
        layers.append(QuantLayer(name, op, q if is_op(q, "QuantizeFP") else None, dq, a_q, a_dq,
                                 layout))
    return layers


def node_attrs_format(node: gs.Node):
    """(Format, channel_bits) of a QuantizeFP / DequantizeFP gs node."""
    from exporter.formats import get_format

    a = node.attrs
    fmt = get_format(f"{'' if a['signed'] else 'u'}e{a['ebits']}m{a['mbits']}")
    return fmt, [int(b) for b in a["channel_bits"]]


def constant_value(graph: gs.Graph, t: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor computed from constants only (scales, zero points: the exporter emits
    them behind Reshape/Expand/Concat of constants), or None when it depends on an input."""
    from .evaluate import evaluate, free_inputs

    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = producer(t)
    if node is not None and node.op == "Constant":
        return np.asarray(node.attrs["value"].values)
    if node is None or free_inputs([t]):
        return None
    return np.asarray(evaluate(graph, [t])[0])


def find_adapter_index(graph: gs.Graph) -> tuple[gs.Variable, np.ndarray] | None:
    """(adapter-index tensor, timestep -> adapter table) of a TALoRA export, or None.

    The exporter selects the adapter with ``Gather(table, timestep)``: a Gather whose data is a 1-D
    integer constant and whose indices come from a graph input.
    """
    graph_inputs = {t.name for t in graph.inputs}
    for node in graph.nodes:
        if node.op != "Gather" or not isinstance(node.inputs[0], gs.Constant):
            continue
        table = np.asarray(node.inputs[0].values)
        if table.ndim != 1 or table.dtype.kind not in "iu" or table.size < 2:
            continue
        from .evaluate import free_inputs

        if {t.name for t in free_inputs([node.inputs[1]])} & graph_inputs:
            return node.outputs[0], table
    return None
