"""The engine layer report: what TensorRT made of each layer, from the builder's own words.

With ``ProfilingVerbosity.DETAILED`` and a verbose logger the builder prints, after a build, one
line per engine layer (checked with TensorRT-RTX 1.7; full TensorRT prints the same through its
engine inspector)::

    Name: node_of_y_myl0_1, LayerType: gemm, Inputs: [ { Name: ..., Dimensions: [64,256], ...,
    Datatype: FP8, ... }], Constants: [ { ..., Dimensions: [256,128], ..., Datatype: FP8 ... }],
    Outputs: [...], TacticName: ..., Metadata: [ONNX Layer: node_of_y][ONNX Layer: node_of_wd]

:func:`parse_layer_lines` turns those lines into rows; :func:`build_report` maps each quantized
layer (the passes' report rows name their GEMM / Conv node) to the engine layer that runs it, its
kind and its precision, and sums up GEMMs and convolutions by precision and weight bytes by type.
Precision is read off the engine layer's data types, not off the graph we gave it: a Q/DQ pattern
TensorRT did not fuse shows up as Float here.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .atomic import atomic_write_json, atomic_write_text

#: the builder's data type names -> bytes per element (FP4 / Int4: half a byte)
DTYPE_BYTES = {"Float": 4.0, "Half": 2.0, "BFloat16": 2.0, "FP8": 1.0, "Int8": 1.0, "Int32": 4.0,
               "Int64": 8.0, "Bool": 1.0, "UInt8": 1.0, "FP4": 0.5, "Int4": 0.5, "E8M0": 1.0}
#: precision of a GEMM / conv, strongest first: the first found among its operands' types
PRECISIONS = ("FP4", "FP8", "Int4", "Int8", "Half", "BFloat16", "Float")
#: TensorRT-RTX's longer names for the same types
_DTYPE_ALIASES = {"FP4E2M1": "FP4", "FP8E4M3": "FP8", "FP8E4M3FN": "FP8"}
_TENSOR = re.compile(r"\{ Name: ([^,]*), Dimensions: \[([^\]]*)\],.*?Datatype: (\w+)")


@dataclass
class EngineLayer:
    name: str
    layer_type: str
    inputs: list[str]
    constants: list[tuple[str, list[int], str]]  # (name, dims, dtype)
    outputs: list[str]
    onnx_layers: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """gemm, conv, pointwise or other. TensorRT-RTX also names fused GEMMs
        ``runtime_fusion`` / ``Fc*``: those count as GEMMs."""
        t = self.layer_type.lower()
        if t in ("gemm", "matrixmultiply", "fullyconnected") or "runtime_fusion" in t \
                or self.name.startswith("Fc"):
            return "gemm"
        if t in ("correlation", "convolution", "deconvolution", "conv"):
            return "conv"
        if t in ("kgen", "pointwise", "elementwise", "activation", "scale", "cast"):
            return "pointwise"
        return "other"

    @property
    def precision(self) -> str:
        """The lowest precision among the data inputs and weight constants (FP8 GEMM: FP8)."""
        types = set(self.inputs) | {c[2] for c in self.weights}
        return next((p for p in PRECISIONS if p in types), "Float")

    @property
    def weights(self) -> list[tuple[str, list[int], str]]:
        """Constants that are weights (rank >= 2), not the alpha / beta / bias scalars."""
        return [c for c in self.constants if len(c[1]) >= 2]

    def weight_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, dims, dtype in self.weights:
            n = 1
            for d in dims:
                n *= max(d, 0)
            out[dtype] = out.get(dtype, 0) + int(n * DTYPE_BYTES.get(dtype, 4.0))
        return out


def _section(line: str, key: str) -> str:
    start = line.find(f"{key}: [")
    if start < 0:
        return ""
    depth, i = 0, start + len(key) + 3
    for j in range(i, len(line)):
        depth += {"[": 1, "]": -1}.get(line[j], 0)
        if depth < 0:
            return line[i:j]
    return line[i:]


def is_layer_line(line: str) -> bool:
    return line.startswith("Name: ") and ", LayerType: " in line


def parse_layer_lines(lines) -> list[EngineLayer]:
    """Engine layers from the builder's ``Name: ..., LayerType: ...`` lines (others are skipped)."""
    layers = []
    for line in lines:
        if not is_layer_line(line):
            continue
        name = line[len("Name: "): line.index(", LayerType: ")]
        ltype = re.search(r"LayerType: ([^,]+)", line).group(1).strip()

        def tensors(key):
            return [(n, [int(d) for d in dims.split(",") if d.strip().lstrip("-").isdigit()],
                     _DTYPE_ALIASES.get(t, t))
                    for n, dims, t in _TENSOR.findall(_section(line, key))]

        layers.append(EngineLayer(name, ltype, [t for _, _, t in tensors("Inputs")], tensors("Constants"),
                                  [t for _, _, t in tensors("Outputs")],
                                  re.findall(r"ONNX Layer: ([^\]]+)\]", line)))
    return layers


def build_report(layers: list[EngineLayer], quant_rows: list[dict] | None = None) -> dict:
    """``{"engine_layers": [...], "onnx_layers": {onnx node: engine layer}, "quantized": [...],
    "summary": {...}}``. ``quant_rows``: the passes' per-layer rows with ``node`` (the GEMM/Conv
    node); each gets the engine layer, kind and precision it runs in (None when not found)."""
    by_onnx: dict[str, EngineLayer] = {}
    for el in layers:
        for onnx_name in el.onnx_layers:
            # an ONNX node can appear in several engine layers (a GEMM and its epilogue): the GEMM wins
            if onnx_name not in by_onnx or (el.kind in ("gemm", "conv")
                                            and by_onnx[onnx_name].kind not in ("gemm", "conv")):
                by_onnx[onnx_name] = el
    counts: dict[str, dict[str, int]] = {"gemm": {}, "conv": {}}
    wbytes: dict[str, int] = {}
    for el in layers:
        if el.kind in counts:
            counts[el.kind][el.precision] = counts[el.kind].get(el.precision, 0) + 1
        for t, b in el.weight_bytes().items():
            wbytes[t] = wbytes.get(t, 0) + b
    quantized = []
    for row in quant_rows or []:
        el = by_onnx.get(row.get("node") or "")
        quantized.append({"layer": row["layer"], "impl": row.get("impl"), "node": row.get("node"),
                          "engine_layer": el.name if el else None, "kind": el.kind if el else None,
                          "precision": el.precision if el else None,
                          "input_dtypes": el.inputs if el else None,
                          "weight_dtypes": sorted({c[2] for c in el.weights}) if el else None})
    q_prec: dict[str, int] = {}
    for q in quantized:
        key = q["precision"] or "not found"
        q_prec[key] = q_prec.get(key, 0) + 1
    summary = {"engine_layers": len(layers), "gemm": counts["gemm"], "conv": counts["conv"],
               "weight_bytes": wbytes, "quantized_layers": len(quantized),
               "quantized_by_precision": q_prec}
    return {"summary": summary, "quantized": quantized,
            "onnx_layers": {k: v.name for k, v in sorted(by_onnx.items())},
            "engine_layers": [{**asdict(el), "kind": el.kind, "precision": el.precision} for el in layers]}


def summary_line(report: dict) -> str:
    s = report["summary"]

    def fmt(d):
        return ", ".join(f"{v} {k}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "none"

    mib = {k: v / 2**20 for k, v in s["weight_bytes"].items()}
    return (f"engine layers {s['engine_layers']}: GEMMs {fmt(s['gemm'])}; convolutions {fmt(s['conv'])}; "
            f"quantized layers {fmt(s['quantized_by_precision'])}; weights "
            + ", ".join(f"{k} {v:.1f} MiB" for k, v in sorted(mib.items(), key=lambda kv: -kv[1])))


def markdown(report: dict) -> str:
    lines = ["# Engine layers", "", summary_line(report), "",
             "| quantized layer | pass impl | ONNX node | engine layer | kind | precision | inputs | weights |",
             "|---|---|---|---|---|---|---|---|"]
    for q in report["quantized"]:
        lines.append(f"| {q['layer']} | {q['impl']} | {q['node']} | {q['engine_layer']} | {q['kind']} | "
                     f"{q['precision']} | {', '.join(q['input_dtypes'] or [])} | "
                     f"{', '.join(q['weight_dtypes'] or [])} |")
    return "\n".join(lines) + "\n"


def write_report(reports_dir: str | Path, layer_lines, quant_rows: list[dict] | None = None) -> dict:
    """Parse, then write ``engine_layers.json`` and ``engine_layers.md`` (atomically)."""
    report = build_report(parse_layer_lines(layer_lines), quant_rows)
    reports_dir = Path(reports_dir)
    atomic_write_json(reports_dir / "engine_layers.json", report)
    atomic_write_text(reports_dir / "engine_layers.md", markdown(report))
    return report


def read_rows(passes_report: str | Path) -> list[dict]:
    """The per-layer rows of a ``reports/passes_<target>.json``."""
    return json.loads(Path(passes_report).read_text()).get("layers", [])
