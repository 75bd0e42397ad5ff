"""A latency and memory ESTIMATE per target and GPU: a roofline over the engine's GEMMs and convs.

Nothing here runs on a GPU. For each MatMul / Gemm / Conv of a target graph, at the engine
profile's opt shapes, FLOPs (2 * M * N * K) and bytes (weights at their stored precision,
activations in and out at 2 bytes, FP8 inputs at 1) are counted; the layer's time is
``max(FLOPs / peak[precision], bytes / bandwidth)`` with the GPU's published dense peak for the
precision the engine layer report says it runs in (exporter.engine_report; layers the report does
not list count as Half). The same graph with every layer in Half is the fp16 engine's estimate.
Pointwise kernels, attention softmax, launch gaps and the imperfect efficiency of real kernels are
left out, so absolute times are lower bounds; the ratio target / fp16 is the useful number.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

@dataclass(frozen=True)
class Gpu:
    """Dense tensor-core peaks (FLOP/s) and memory bandwidth (B/s), from NVIDIA's datasheets and
    architecture whitepapers (docs/performance.md); None: no such tensor cores."""

    name: str
    sm: int
    half: float
    fp8: float | None
    fp4: float | None
    bandwidth: float
    memory_gb: float


GPUS = (
    Gpu("H100 SXM", 90, 989e12, 1979e12, None, 3.35e12, 80),
    Gpu("L40S", 89, 362e12, 733e12, None, 0.864e12, 48),
    # GeForce: the dense rates with FP16 accumulate (half of the "AI TOPS", which are sparse)
    Gpu("RTX 4090", 89, 330e12, 660e12, None, 1.008e12, 24),
    Gpu("RTX 5090", 120, 419e12, 838e12, 1676e12, 1.792e12, 32),
    Gpu("B200", 100, 2250e12, 4500e12, 9000e12, 8.0e12, 180),
)
#: which GPUs a target's engine runs on (sm ranges)
TARGET_SMS = {"fp8": (89, 90), "native": (100, 120), "reference": (75, 120), "plugin": (80, 90)}
_BYTES = {"FP4": 0.5, "FP8": 1.0, "Int4": 0.5, "Int8": 1.0, "Half": 2.0, "BFloat16": 2.0, "Float": 4.0}


def peak(gpu: Gpu, precision: str) -> float:
    """FLOP/s for a GEMM in ``precision``; fp32 GEMMs at half the Half rate (TF32); a precision
    the GPU has no tensor cores for runs at the next one up."""
    if precision == "FP4" and gpu.fp4:
        return gpu.fp4
    if precision in ("FP4", "FP8") and gpu.fp8:
        return gpu.fp8
    return gpu.half / (2 if precision == "Float" else 1)


_SMALL = 4096  # elements: tensors this small that are computable (shape arithmetic) are evaluated


def static_shapes(model, input_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Every tensor's static shape at the given input shapes, by one pass over the nodes in order.

    ONNX's own inference cannot do this for our graphs: its GroupNormalization inference gives no
    shape, so nothing after the first norm gets one, and its data propagation stops at the
    Reshape/Squeeze chains the exporter computes batch sizes with. Here small computable tensors
    (shape arithmetic) are evaluated with onnx.reference, GroupNormalization keeps its input's
    shape, and every other node goes through its schema's inference with those values.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    m = onnx.inliner.inline_local_functions(model) if model.functions else model
    opsets = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    types: dict[str, onnx.TypeProto] = {}
    values: dict[str, np.ndarray] = {}

    def set_value(name, arr):
        arr = np.asarray(arr)
        values[name] = arr
        types[name] = onnx.helper.make_tensor_type_proto(
            onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))

    for init in m.graph.initializer:
        types[init.name] = onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims))
        if int(np.prod(init.dims)) <= _SMALL and init.data_location != onnx.TensorProto.EXTERNAL:
            values[init.name] = numpy_helper.to_array(init)
    for inp in m.graph.input:
        tt = inp.type.tensor_type
        dims = input_shapes.get(inp.name) or [d.dim_value if d.HasField("dim_value") else None
                                                 for d in tt.shape.dim]
        types[inp.name] = onnx.helper.make_tensor_type_proto(tt.elem_type, dims)

    def dims_of(name):
        t = types.get(name)
        if t is None or not t.tensor_type.HasField("shape"):
            return None
        d = [x.dim_value if x.HasField("dim_value") else None for x in t.tensor_type.shape.dim]
        return None if None in d else d

    for node in m.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Shape" and dims_of(node.input[0]) is not None:
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            set_value(node.output[0], np.array(dims_of(node.input[0])[start:end], np.int64))
            continue
        if node.op_type == "GroupNormalization" and node.input[0] in types:
            types[node.output[0]] = types[node.input[0]]
            continue
        if all(i in values for i in ins) and sum(values[i].size for i in ins) <= _SMALL:
            try:  # shape arithmetic: evaluate it, so a later Reshape/Expand sees the numbers
                outs = ReferenceEvaluator(node).run(None, {i: values[i] for i in ins})
            except Exception:  # noqa: BLE001 - an op onnx.reference lacks: fall back to inference
                outs = None
            if outs is not None and all(np.asarray(o).size <= _SMALL for o in outs):
                for name, o in zip(node.output, outs):
                    set_value(name, o)
                continue
        if not all(i in types for i in ins):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain or "ai.onnx", 1),
                                          node.domain)
            out = onnx.shape_inference.infer_node_outputs(
                schema, node, {i: types[i] for i in ins},
                {i: numpy_helper.from_array(values[i], i) for i in ins if i in values})
        except Exception:  # noqa: BLE001 - unknown op or failed inference: its outputs stay unknown
            continue
        types.update(out)
    return {name: d for name in types if (d := dims_of(name)) is not None}


def gemm_layers(model, input_shapes: dict[str, list[int]]) -> list[dict]:
    """[{"node", "op", "flops", "weight_elems", "act_elems"}] for every MatMul / Gemm / Conv of an
    ONNX model (weights need not be loaded) at the given input shapes."""
    shapes = static_shapes(model, input_shapes)
    # an operand computed from a non-scalar input is an activation (attention's K and V), not a
    # weight; the scalar timestep only selects weights (TALoRA's Gather of codes)
    data = {i.name for i in model.graph.input if len(i.type.tensor_type.shape.dim) > 0}
    for n in model.graph.node:
        if any(i in data for i in n.input):
            data.update(n.output)
    rows = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, w, y = shapes.get(n.input[0]), shapes.get(n.input[1]), shapes.get(n.output[0])
        if a is None or w is None or y is None:
            continue
        if n.op_type == "Conv":
            k = int(np.prod(w[1:]))  # C_in/groups * kh * kw
        else:
            k = a[-1]
        act = int(np.prod(a)) + int(np.prod(y))
        weight = 0 if n.input[1] in data else int(np.prod(w))
        rows.append({"node": n.name, "op": n.op_type, "flops": 2 * int(np.prod(y)) * k,
                     "weight_elems": weight, "act_elems": act + (int(np.prod(w)) - weight)})
    return rows


def estimate(layers: list[dict], precision_of: dict[str, str], gpu: Gpu, all_half: bool = False) -> dict:
    """{"ms", "weight_bytes", "compute_bound"} of the layers on ``gpu``."""
    t = wbytes = 0.0
    bound = 0
    for r in layers:
        p = "Half" if all_half else precision_of.get(r["node"], "Half")
        act = 1.0 if p in ("FP8", "FP4") else 2.0
        nbytes = r["weight_elems"] * _BYTES.get(p, 2.0) + r["act_elems"] * act
        tc, tm = r["flops"] / peak(gpu, p), nbytes / gpu.bandwidth
        t += max(tc, tm)
        bound += tc >= tm
        wbytes += r["weight_elems"] * _BYTES.get(p, 2.0)
    return {"ms": t * 1e3, "weight_bytes": int(wbytes), "compute_bound_layers": bound}


def roofline(model, input_shapes: dict[str, list[int]], target: str, engine_report: dict | None) -> dict:
    """The estimate for each GPU the target builds for, next to an fp16 engine's; JSON-ready."""
    layers = gemm_layers(model, input_shapes)
    prec = {}
    for el in (engine_report or {}).get("engine_layers", []):
        if el["kind"] in ("gemm", "conv"):
            for o in el["onnx_layers"]:
                prec.setdefault(o, el["precision"])
    lo, hi = TARGET_SMS.get(target, (0, 999))
    # a GEMM whose shapes stay unknown (an op neither onnx.reference nor its schema can size) is
    # left out, and the estimate says how many it covers rather than pass a partial sum as the UNet
    total = sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in model.graph.node)
    out = {"label": "ESTIMATE (roofline over GEMMs/convs at published dense peaks; not measured)",
           "target": target, "shapes": input_shapes, "layers": len(layers), "gemm_nodes": total,
           "flops": int(sum(r["flops"] for r in layers)), "gpus": {}}
    for gpu in GPUS:
        if not lo <= gpu.sm <= hi:
            continue
        est, half = estimate(layers, prec, gpu), estimate(layers, prec, gpu, all_half=True)
        out["gpus"][gpu.name] = {"target": est, "fp16": half,
                                 "speedup_vs_fp16": half["ms"] / est["ms"] if est["ms"] else None}
    return out


def summary_lines(r: dict) -> list[str]:
    covered = f"{r['layers']} of {r['gemm_nodes']} GEMMs/convs" if "gemm_nodes" in r else f"{r['layers']} GEMMs/convs"
    return [f"{name}: {g['target']['ms']:.1f} ms vs fp16 {g['fp16']['ms']:.1f} ms per UNet call "
            f"({g['speedup_vs_fp16']:.2f}x), GEMM/conv weights {g['target']['weight_bytes'] / 1e9:.2f} GB "
            f"vs {g['fp16']['weight_bytes'] / 1e9:.2f} GB, over {covered} [estimate]" for name, g in r["gpus"].items()]
