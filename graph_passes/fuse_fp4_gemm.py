"""fuse_fp4_gemm: activation Q/DQ + weight DQ (+ channel regroup) + MatMul/Gemm (+ bias) -> FP4Gemm.

One ``export_engine::FP4Gemm`` node per quantized Linear layer (docs/fp4gemm_contract.md): the
weight codes are packed densely per width group (:func:`exporter.packing.pack`), stored as INT8
initializers ``[A, bytes]`` (A adapters for TALoRA, selected by the adapter-index input), with
per-row scales, a decode table per group, the activation format as attributes and the output
permutation and bias for the epilogue. The node carries the ``plugin_namespace``/``plugin_version``
TensorRT's parser needs to pick our plugin, and its function body keeps the graph runnable in
ONNX Runtime. Convolutions keep their DequantizeFP (codes, no float copy) and are not fused.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from exporter.formats import with_bits
from exporter.onnx_ops import DOMAIN, fp4gemm_attrs
from exporter.packing import pack

from .framework import PassContext
from .patterns import GEMM_OPS, QuantLayer, constant_value, find_quant_layers, node_attrs_format
from .quantize_weights import read_codes


def _groups(bits: list[int]) -> tuple[list[int], list[int]]:
    """Runs of equal widths, in order: (group_bits, group_sizes)."""
    gb, gs_ = [], []
    for b in bits:
        if gb and gb[-1] == b:
            gs_[-1] += 1
        else:
            gb.append(b)
            gs_.append(1)
    if len(set(gb)) != len(gb):
        raise ValueError("channel widths are not grouped; run pack_mixed_precision first")
    return gb, gs_


def pack_rows(codes: np.ndarray, group_bits: list[int], group_sizes: list[int]) -> np.ndarray:
    """[..., N, K] uint8 codes -> [..., bytes] uint8: each group's rows packed at its width, in order."""
    parts, row = [], 0
    for b, n in zip(group_bits, group_sizes):
        block = pack(codes[..., row:row + n, :], b)  # [..., n, ceil(K*b/8)]
        parts.append(block.reshape(block.shape[:-2] + (-1,)))
        row += n
    return np.concatenate(parts, axis=-1)


def _weight_matrix(layer: QuantLayer):
    """(transposed?, restore-Gather or None) if the layer computes x @ W^T, else None."""
    op = layer.op
    gather = next((n for n in layer.layout if n.op == "Gather"), None)
    transposes = [n for n in layer.layout if n.op == "Transpose"]
    if op.op == "Gemm":
        a = op.attrs
        ok = (not transposes and a.get("transB", 0) == 1 and a.get("transA", 0) == 0
              and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0)
        return (True, gather) if ok else None
    if len(transposes) == 1 and list(transposes[0].attrs.get("perm", [1, 0])) == [1, 0]:
        return True, gather
    return None


def fuse_layer(graph: gs.Graph, layer: QuantLayer, adapter_zero: gs.Constant) -> str | None:
    """Replace one Linear layer by an FP4Gemm node; returns why not when it cannot."""
    if layer.op.op not in GEMM_OPS:
        return "not a GEMM"
    shape = _weight_matrix(layer)
    if shape is None:
        return "weight is not used as x @ W^T"
    _, restore = shape
    w_fmt, bits = node_attrs_format(layer.w_dq)
    if not w_fmt.signed:
        return f"weight format {w_fmt.name} has a zero point (FP4Gemm weights are signed)"
    codes, adapter, _ = read_codes(layer.w_dq.inputs[0])
    if codes is None:
        return "weight codes are not constant (run quantize_weights first)"
    adapter = adapter if adapter is not None else adapter_zero
    if codes.ndim != 3:
        return f"weight codes have rank {codes.ndim - 1}, not 2"
    n, k = codes.shape[1:]
    bits = bits * n if len(bits) == 1 else bits
    group_bits, group_sizes = _groups(bits)
    perm = np.arange(n) if restore is None else np.argsort(np.asarray(restore.inputs[1].values))
    scale = constant_value(graph, layer.w_dq.inputs[1])
    if scale is None or scale.size != n:
        return "weight scale is not a per-channel constant"
    lut = np.zeros((len(group_bits), 256), np.float32)
    for g, b in enumerate(group_bits):
        table = with_bits(w_fmt, b).table
        lut[g, : table.size] = table
    # activations
    if layer.a_q is not None:
        a_fmt, _ = node_attrs_format(layer.a_q)
        dynamic = bool(layer.a_q.attrs.get("dynamic", 0))
        if dynamic and list(layer.a_q.attrs.get("axes", [-1])) not in ([-1],):
            return "per-token activation scales are not along the last axis"
        x = layer.a_q.inputs[0]
        a_scale = np.float32(1.0) if dynamic else constant_value(graph, layer.a_q.inputs[1])
        a_zero = np.float32(0.0) if dynamic else constant_value(graph, layer.a_q.inputs[2])
        if a_scale is None or a_zero is None or np.size(a_scale) != 1 or np.size(a_zero) != 1:
            return "activation scale/zero point are not per-tensor constants"
        mode = "dynamic" if dynamic else "static"
    else:
        a_fmt, x, a_scale, a_zero, mode = None, layer.op.inputs[0], np.float32(1), np.float32(0), "static"
    add, bias_t = layer.bias_add()
    bias = np.zeros(n, np.float32) if bias_t is None else np.asarray(bias_t.values, np.float32)[perm]
    out = add.outputs[0] if add is not None else layer.op.outputs[0]
    name = layer.name
    inputs = [
        x,
        gs.Constant(f"{name}.fp4gemm.W", pack_rows(codes, group_bits, group_sizes).view(np.int8)),
        gs.Constant(f"{name}.fp4gemm.w_scale", scale.reshape(n).astype(np.float32)),
        gs.Constant(f"{name}.fp4gemm.w_lut", lut),
        gs.Constant(f"{name}.fp4gemm.a_scale", np.asarray(a_scale, np.float32).reshape(())),
        gs.Constant(f"{name}.fp4gemm.a_zero", np.asarray(a_zero, np.float32).reshape(())),
        gs.Constant(f"{name}.fp4gemm.bias", bias),
        gs.Constant(f"{name}.fp4gemm.perm", perm.astype(np.int32)),
        adapter,
    ]
    attrs = fp4gemm_attrs(k, n, group_bits, group_sizes, a_fmt, mode)
    layer.op.outputs.clear()
    if add is not None:
        add.outputs.clear()
    graph.nodes.append(gs.Node("FP4Gemm", f"{name}/FP4Gemm", attrs, inputs, [out], domain=DOMAIN))
    return None


def fuse_fp4_gemm(graph: gs.Graph, ctx: PassContext) -> dict:
    adapter_zero = gs.Constant("fp4gemm.adapter_0", np.array(0, np.int64))
    fused, kept = 0, {}
    for layer in find_quant_layers(graph):
        why = fuse_layer(graph, layer, adapter_zero)
        if why is None:
            fused += 1
            ctx.layer_report.append({"layer": layer.name, "target": "plugin", "impl": "FP4Gemm"})
        else:
            kept[layer.name] = why
            ctx.layer_report.append({"layer": layer.name, "target": "plugin",
                                     "impl": "reference ops", "why": why})
    ctx.metadata["unfused"] = kept
    return {"fused": fused, "kept_as_reference_ops": len(kept)} if fused or kept else {}
