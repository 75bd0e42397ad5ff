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


def gemm_layers(model, input_shapes: dict[str, list[int]]) -> list[dict]:
    """[{"node", "op", "flops", "weight_elems", "act_elems"}] for every MatMul / Gemm / Conv of an
    ONNX model (weights need not be loaded) at the given input shapes."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, input_shapes[inp.name]):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in m.graph.initializer:
        shapes[init.name] = list(init.dims)
    rows = []
    for n in m.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        a, w, y = shapes.get(n.input[0]), shapes.get(n.input[1]), shapes.get(n.output[0])
        if not a or not w or not y or None in a + w + y:
            continue
        if n.op_type == "Conv":
            k = int(np.prod(w[1:]))  # C_in/groups * kh * kw
            flops = 2 * int(np.prod(y)) * k
        else:
            k = a[-1]
            flops = 2 * int(np.prod(y)) * k
        rows.append({"node": n.name, "op": n.op_type, "flops": flops, "weight_elems": int(np.prod(w)),
                     "act_elems": int(np.prod(a)) + int(np.prod(y))})
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
    # GEMMs whose shapes ONNX shape inference cannot resolve at these input shapes are left out
    # (on the SDXL fp8 target most of them: the export's symbolic value_info survives inference);
    # the estimate says how many it covers rather than pass a partial sum for the whole UNet
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
