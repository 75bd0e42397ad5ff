"""cleanup: dead nodes, no-op Casts and Identities, unused initializers.

The pass framework already drops dead nodes after every pass; this pass also removes Casts to
the dtype their input already has and Identity nodes between two ops, which the exporter leaves
behind (fewer nodes for TensorRT's parser and ORT's session setup).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx.helper import tensor_dtype_to_np_dtype

from .framework import PassContext


def _bypass(graph: gs.Graph, node: gs.Node) -> bool:
    """Route the node's consumers to its input; False when its output is a graph output."""
    src, dst = node.inputs[0], node.outputs[0]
    if dst in graph.outputs:
        return False
    for consumer in list(dst.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is dst:
                consumer.inputs[i] = src
    node.outputs.clear()
    return True


def _same_dtype(have, to: int) -> bool:
    try:
        return have is not None and np.dtype(have) == tensor_dtype_to_np_dtype(to)
    except TypeError:  # onnx-only dtypes (bfloat16, float8, ...): leave the Cast alone
        return False


def cleanup(graph: gs.Graph, ctx: PassContext) -> dict:
    casts = identities = 0
    for node in list(graph.nodes):
        if node.op == "Cast" and node.domain in (None, "", "ai.onnx"):
            if _same_dtype(node.inputs[0].dtype, node.attrs["to"]):
                casts += _bypass(graph, node)
        elif node.op == "Identity" and node.domain in (None, "", "ai.onnx"):
            identities += _bypass(graph, node)
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    changes = {"noop_casts": casts, "identities": identities, "dead_nodes": before - len(graph.nodes)}
    return {k: v for k, v in changes.items() if v}
