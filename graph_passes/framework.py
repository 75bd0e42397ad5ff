"""Pass framework: a pass takes a graph and returns it with a record of what changed.

A pass is a function ``(graph: gs.Graph, ctx: PassContext) -> dict`` that edits the
onnx-graphsurgeon graph in place and returns what it did (counts, names); an empty dict means
nothing changed. :func:`run_passes` runs a list of them, logs per pass the node count, initializer
bytes and time, and checks the graph after each pass (ONNX checker and shape inference on the
graph with its large weights turned into inputs, so a 5 GB UNet is checked in seconds).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger("export_engine.passes")


@dataclass
class PassContext:
    """What passes may need beyond the graph: options and the export's metadata."""

    options: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    #: per-layer report rows passes may append to (e.g. which target each layer got)
    layer_report: list = field(default_factory=list)


GraphPass = Callable[[gs.Graph, PassContext], dict]


@dataclass
class PassRecord:
    name: str
    changes: dict
    nodes_before: int
    nodes_after: int
    bytes_before: int
    bytes_after: int
    seconds: float

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def line(self) -> str:
        return (f"{self.name:24s} nodes {self.nodes_before:6d} -> {self.nodes_after:6d}  "
                f"weights {self.bytes_before / 2**20:9.1f} -> {self.bytes_after / 2**20:9.1f} MiB  "
                f"{self.seconds:6.2f} s  {_summary(self.changes)}")


def _summary(changes: dict) -> str:
    parts = [f"{k}={v}" for k, v in changes.items() if isinstance(v, (int, float, str))]
    return ", ".join(parts) if parts else ("changed" if changes else "no change")


def initializer_bytes(graph: gs.Graph) -> int:
    """Bytes held by constant tensors of the graph and its functions (each counted once)."""
    seen, total = set(), 0
    for tensors in [graph.tensors()] + [f.tensors() for f in graph.functions]:
        for t in tensors.values():
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                total += _nbytes(t)
    return total


_FOUR_BIT = (onnx.TensorProto.FLOAT4E2M1, onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _nbytes(t: gs.Constant) -> int:
    """Bytes of a constant as stored in ONNX (4-bit types: two values per byte)."""
    n = int(np.prod(t.shape, dtype=np.int64))
    try:
        return n * np.dtype(t.dtype).itemsize
    except TypeError:  # onnx-only dtypes (FLOAT4E2M1, FLOAT8E4M3FN, ...)
        return (n + 1) // 2 if t.dtype in _FOUR_BIT else n


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx -> gs graph. Constant nodes holding list attributes (``value_ints=[]`` from the dynamo
    exporter) become tensor-valued first: onnx-graphsurgeon cannot write an empty list back."""
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        attr = node.attribute[0]
        if attr.name in ("value_ints", "value_floats"):
            values = onnx.helper.get_attribute_value(attr)
            dtype = np.int64 if attr.name == "value_ints" else np.float32
            tensor = onnx.numpy_helper.from_array(np.asarray(values, dtype))
            node.ClearField("attribute")
            node.attribute.append(onnx.helper.make_attribute("value", tensor))
    return gs.import_onnx(model)


def to_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """Export a gs graph with the function bodies of exactly the export_engine ops it uses."""
    from exporter.onnx_ops import DOMAIN, DOMAIN_VERSION, functions_for

    model = gs.export_onnx(graph, do_type_check=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    # keep the bodies the graph came with; add those of ops a pass introduced; drop unused ones
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {f.name: f for f in model.functions if f.domain == DOMAIN and f.name in used}
    missing = [f for f in functions_for(model.graph, opset) if f.name not in have]
    del model.functions[:]
    model.functions.extend(sorted(list(have.values()) + missing, key=lambda f: f.name))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    model.ir_version = 10
    return model


def check_graph(graph: gs.Graph, full: bool = False) -> onnx.ModelProto:
    """ONNX checker + strict shape inference on the graph, large weights left out (as inputs).

    Returns the checked (weightless) model. Raises onnx.checker.ValidationError /
    onnx.shape_inference.InferenceError naming the node.
    """
    with _weightless(graph):
        model = to_onnx(graph)
    onnx.checker.check_model(model, full_check=False)
    if full:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=False)
    return model


@contextlib.contextmanager
def _weightless(graph: gs.Graph):
    """The graph with its large constants turned, for the duration, into graph inputs of the same
    dtype and shape (gs morphs the tensors in place and back): checking never copies the weights,
    so a 5 GB UNet is checked in seconds."""
    morphed = []
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and _nbytes(t) > 4096:
            # keep the (possibly lazy, not yet loaded) values and their export settings
            morphed.append((t, t._values, t.data_location, t._export_dtype))  # noqa: SLF001
    inputs = list(graph.inputs)
    try:
        for t, *_ in morphed:
            t.to_variable(dtype=t.dtype, shape=list(t.shape))
            t.type = "tensor_type"
        graph.inputs = inputs + [t for t, *_ in morphed]
        yield graph
    finally:
        graph.inputs = inputs
        for t, values, location, export_dtype in morphed:
            t.to_constant(values, export_dtype=export_dtype)
            t.data_location = location


def run_passes(graph: gs.Graph, passes: list[GraphPass], ctx: PassContext | None = None,
               check: bool = True, quiet: bool = False) -> list[PassRecord]:
    """Run ``passes`` in order on ``graph`` (in place); returns one record per pass."""
    ctx = ctx or PassContext()
    records = []
    for p in passes:
        name = getattr(p, "__name__", type(p).__name__)
        nodes_before, bytes_before = len(graph.nodes), initializer_bytes(graph)
        start = time.perf_counter()
        changes = p(graph, ctx) or {}
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        seconds = time.perf_counter() - start
        if check:
            try:
                check_graph(graph, full=True)
            except Exception as err:  # name the pass that broke the graph
                raise RuntimeError(f"graph check failed after pass {name!r}: {err}") from err
        rec = PassRecord(name, changes, nodes_before, len(graph.nodes), bytes_before,
                         initializer_bytes(graph), seconds)
        records.append(rec)
        (log.debug if quiet else log.info)(rec.line())
    return records
