"""Evaluate constant subgraphs of a graph with ONNX Runtime (the same numerics as the model).

Passes fold weight paths (LoRA, TALoRA, smoothing) into initializers by running exactly the
graph's own nodes on the exact inputs, so a fold can never compute something the graph would not.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from .framework import uncached_values


def _producers(targets: list[gs.Tensor], stop: set[str]) -> list[gs.Node]:
    nodes, seen, stack = [], set(), list(targets)
    while stack:
        t = stack.pop()
        if t.name in stop or isinstance(t, gs.Constant) or not t.inputs:
            continue
        node = t.inputs[0]
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(node.inputs)
    return nodes


def free_inputs(targets: list[gs.Tensor]) -> list[gs.Variable]:
    """Non-constant leaves the targets depend on (graph inputs or values without a producer)."""
    leaves, seen = [], set()
    for node in _producers(targets, set()):
        for t in node.inputs:
            if isinstance(t, gs.Variable) and not t.inputs and t.name and t.name not in seen:
                seen.add(t.name)
                leaves.append(t)
    for t in targets:
        if isinstance(t, gs.Variable) and not t.inputs and t.name not in seen:
            seen.add(t.name)
            leaves.append(t)
    return leaves


def evaluate(graph: gs.Graph, targets: list[gs.Tensor], feeds: dict[str, np.ndarray] | None = None,
             ) -> list[np.ndarray]:
    """Values of ``targets``, computing only their producers; ``feeds`` names free inputs."""
    feeds = feeds or {}
    nodes = _producers(targets, set(feeds))
    if not nodes:
        return [np.asarray(t.values) if isinstance(t, gs.Constant) else feeds[t.name] for t in targets]
    inputs = []
    for name, value in feeds.items():
        inputs.append(gs.Variable(name, dtype=value.dtype, shape=value.shape))
    # the subgraph is built on fresh tensors so the original graph is never touched
    ops = {n.op for n in nodes}  # only the functions it calls: each is toposorted on export
    sub = gs.Graph(opset=graph.opset, functions=[f for f in graph.functions if f.name in ops])
    tensor_map: dict[str, gs.Tensor] = {v.name: v for v in inputs}

    def fresh(t: gs.Tensor) -> gs.Tensor:
        if t.name in tensor_map:
            return tensor_map[t.name]
        if isinstance(t, gs.Constant):
            new = gs.Constant(t.name, uncached_values(t))
        else:
            new = gs.Variable(t.name, dtype=t.dtype, shape=t.shape)
        tensor_map[t.name] = new
        return new

    for node in reversed(nodes):  # producers were collected consumer-first
        sub.nodes.append(gs.Node(node.op, node.name, dict(node.attrs),
                                 [fresh(i) if i.name else gs.Variable.empty() for i in node.inputs],
                                 [fresh(o) for o in node.outputs], domain=node.domain))
    sub.inputs = inputs
    outs = [fresh(t) for t in targets]
    sub.outputs = outs
    sub.toposort()
    model = gs.export_onnx(sub, do_type_check=False)
    model.ir_version = min(model.ir_version, 10)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    # one short-lived session per fold: an arena would keep every layer's buffers (a UNet's worth)
    opts.enable_cpu_mem_arena = False
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([o.name for o in outs], {k: v for k, v in feeds.items()})
