"""The four targets, from one pass pipeline over the export.

- ``reference``: standard ONNX ops only (our ops lowered by ``lower_quant``), weights dequantized
  to float constants; runs in ONNX Runtime and any TensorRT; exactly the quantized model's numerics.
- ``plugin``: one ``FP4Gemm`` node per quantized Linear (our TensorRT plugin), packed weights;
  convolutions keep DequantizeFP on codes. No float copy of a quantized weight remains.
- ``fp8``: every quantized Linear and Conv as FP8 E4M3 Q/DQ around its GEMM (Ada / Hopper FP8
  tensor cores), numerics unchanged: our 4-bit values are E4M3 values (:mod:`graph_passes.fp8`).
- ``native``: Blackwell NVFP4 (FLOAT4E2M1 weights, FP8 E4M3 block scales of 16) where a layer's
  quantization is expressible natively, FP8 as in ``fp8`` for the other layers; a per-layer
  report says which layer got what and why (:mod:`graph_passes.native_fp4`).
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import onnx

from .cleanup import cleanup
from .fold_lora import fold_lora
from .framework import PassContext, load_graph, run_passes, save_graph
from .fuse_fp4_gemm import fuse_fp4_gemm
from .lower_quant import lower_quant, lower_quant_fold_weights
from .pack_mixed_precision import pack_mixed_precision
from .quantize_weights import quantize_weights

log = logging.getLogger("export_engine.passes")

TARGETS = ("reference", "plugin", "fp8", "native")


def target_passes(target: str) -> list:
    common = [fold_lora, quantize_weights]
    if target == "reference":
        return common + [lower_quant_fold_weights, cleanup]
    if target == "plugin":
        return common + [pack_mixed_precision, fuse_fp4_gemm, lower_quant, cleanup]
    if target == "fp8":
        from .fp8 import to_fp8

        return common + [to_fp8, lower_quant, cleanup]
    if target == "native":
        from .fp8 import to_fp8
        from .native_fp4 import to_native_fp4

        return common + [to_native_fp4, to_fp8, lower_quant, cleanup]
    raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def _standard_ops_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """Standard ops only: inline the bodies of any of our nodes ``lower_quant`` left generic (its
    ``left_generic`` count), then drop our functions and domain. Inlining serializes the model;
    ``save_graph`` calls this after streaming the weights out, so the proto stays small."""
    from onnx.inliner import inline_selected_functions

    from exporter.onnx_ops import DOMAIN

    if any(n.domain == DOMAIN for n in model.graph.node):
        ours = [(f.domain, f.name) for f in model.functions if f.domain == DOMAIN]
        model = inline_selected_functions(model, ours)
    # TensorRT's own ops keep their bodies (native_fp4), so ONNX Runtime can run the graph too
    trt_functions = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(trt_functions)
    keep = [o for o in model.opset_import if o.domain != DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def build_target(export_path: str | Path, target: str, out_path: str | Path, *,
                 user_loras: list | None = None, check: bool = True, quiet: bool = False) -> dict:
    """Run the target's passes on the export at ``export_path`` and save it atomically.

    Returns ``{"target", "path", "data", "passes": [...], "layers": [...], "metadata": {...}}``.
    """
    passes = target_passes(target)  # an unknown target fails before the export is read
    graph = load_graph(export_path)
    ctx = PassContext(options={"user_loras": user_loras or [], "target": target})
    records = run_passes(graph, passes, ctx, check=check, quiet=quiet)

    def finish(model: onnx.ModelProto) -> onnx.ModelProto:
        model.producer_name = "export-engine"
        return model if target == "plugin" else _standard_ops_only(model)

    data = save_graph(graph, out_path, finish)
    return {"target": target, "path": str(out_path), "data": str(data) if data else None,
            "passes": [{**asdict(r), "changed": r.changed} for r in records],
            "layers": ctx.layer_report, "metadata": ctx.metadata}
