"""fold_lora: constant-fold each quantized layer's weight path (W + s B A, TALoRA, smoothing).

After this pass the weight QuantizeFP reads either one float initializer, or, for TALoRA, one
folded weight per adapter stacked as ``[A, ...]`` behind ``Gather(stack, adapter_index)`` where
``adapter_index = Gather(timestep -> adapter table, timestep)`` stays in the graph.

User LoRA files (``ctx.options["user_loras"]``: a list of ``(path, {module: LoraDelta})`` from
:func:`graph_passes.lora_files.read_lora_file`) are added to the float ``<module>.weight`` initializers first,
so they pass through the same fold and are then re-quantized by ``quantize_weights`` with the
calibrated scales: no re-calibration. A LoRA may also target a layer kept in high precision.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .evaluate import evaluate, free_inputs
from .framework import PassContext
from .lora_files import check_against_layers
from .patterns import find_adapter_index, find_quant_layers


def _weight_initializers(graph: gs.Graph) -> dict[str, gs.Constant]:
    return {name[: -len(".weight")]: t for name, t in graph.tensors().items()
            if isinstance(t, gs.Constant) and name.endswith(".weight") and t.values.ndim >= 2}


def apply_user_loras(graph: gs.Graph, user_loras: list[tuple[str, dict]]) -> int:
    """Add every user LoRA delta to its ``<module>.weight`` initializer; returns layers touched.

    All files are checked against the graph before any weight changes."""
    weights = _weight_initializers(graph)
    shapes = {m: (t.values.shape[0], int(np.prod(t.values.shape[1:]))) for m, t in weights.items()}
    for path, deltas in user_loras:
        check_against_layers(deltas, shapes, path=path)
    touched = set()
    for _, deltas in user_loras:
        for module, d in deltas.items():
            w = weights[module]
            total = w.values.astype(np.float32) + d.delta().reshape(w.values.shape)
            w.values = total.astype(w.values.dtype)
            touched.add(module)
    return len(touched)


def _scalar(graph: gs.Graph, index: gs.Variable) -> gs.Variable:
    """The adapter index as a rank-0 tensor (the exporter may give it shape [1]), so that
    Gather(stack [A, ...], index) has the weight's own shape."""
    if index.shape is not None and len(index.shape) == 0:
        return index
    scalar = gs.Variable("talora.adapter_index", dtype=np.int64, shape=[])
    graph.nodes.append(gs.Node("Reshape", "talora/adapter_index_scalar", {},
                               [index, gs.Constant("talora.scalar_shape", np.zeros(0, np.int64))], [scalar]))
    return scalar


def fold_lora(graph: gs.Graph, ctx: PassContext) -> dict:
    changes: dict = {}
    user = ctx.options.get("user_loras") or []
    if user:
        changes["user_lora_layers"] = apply_user_loras(graph, user)
    adapter = find_adapter_index(graph)
    scalar_index = None
    folded = talora = 0
    for layer in find_quant_layers(graph):
        w = layer.weight_input
        if isinstance(w, gs.Constant) or layer.w_q is None:
            continue
        free = free_inputs([w])
        if not free:
            value = evaluate(graph, [w])[0]
            layer.w_q.inputs[0] = gs.Constant(f"{layer.name}.weight_folded", np.ascontiguousarray(value))
            folded += 1
            continue
        if adapter is None:
            raise ValueError(f"layer {layer.name}: its weight depends on graph inputs "
                             f"{[t.name for t in free]} but the graph has no TALoRA adapter table")
        index, table = adapter
        if scalar_index is None:
            scalar_index = _scalar(graph, index)
        stack = np.stack([evaluate(graph, [w], {index.name: np.array(k, np.int64)})[0]
                          for k in range(int(table.max()) + 1)])
        selected = gs.Variable(f"{layer.name}.weight_selected", dtype=stack.dtype, shape=stack.shape[1:])
        graph.nodes.append(gs.Node("Gather", f"{layer.name}/select_adapter", {"axis": 0},
                                   [gs.Constant(f"{layer.name}.weight_per_adapter", stack), scalar_index],
                                   [selected]))
        layer.w_q.inputs[0] = selected
        talora += 1
    if folded:
        changes["folded"] = folded
    if talora:
        changes["talora_layers"] = talora
        changes["adapters"] = int(adapter[1].max()) + 1
    return changes
