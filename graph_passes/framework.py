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
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

G_LOGGER.colors = False  # else its first warning is one about the missing `colored` package

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
    #: the process's peak resident set size so far, after this pass (GiB)
    peak_rss_gib: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def line(self) -> str:
        return (f"{self.name:24s} nodes {self.nodes_before:6d} -> {self.nodes_after:6d}  "
                f"weights {self.bytes_before / 2**20:9.1f} -> {self.bytes_after / 2**20:9.1f} MiB  "
                f"{self.seconds:6.2f} s  peak RSS {self.peak_rss_gib:5.2f} GiB  {_summary(self.changes)}")


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


class _ExternalValues(LazyValues):
    """An initializer's values left in the export's external data file and read only when a pass
    asks for them. A UNet's weights are then never all in memory at once: a pass reads a layer's
    weight, replaces it (codes, a folded copy) and the float original is dropped with its node."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        copy = onnx.TensorProto()
        copy.CopyFrom(self.tensor)  # loading external data writes into the proto: keep ours empty
        return onnx.numpy_helper.to_array(copy, base_dir=self.base_dir)


def uncached_values(t: gs.Constant) -> np.ndarray:
    """A constant's values without keeping a lazily loaded copy in the graph (``t.values`` would
    cache it): for passes that read a weight once to replace it."""
    return t._values.load() if isinstance(t._values, LazyValues) else t.values  # noqa: SLF001


def load_graph(path: str | Path) -> gs.Graph:
    """The ONNX file at ``path`` as a gs graph whose external weights load lazily (see
    :class:`_ExternalValues`); :func:`to_onnx` reads whatever no pass replaced."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = import_graph(model)
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) \
                and t.data_location == onnx.TensorProto.EXTERNAL:  # noqa: SLF001
            t._values = _ExternalValues(t._values.tensor, str(path.parent))  # noqa: SLF001
            t.data_location = None
    return graph


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
    # gs warns once per process that FP8 initializers keep their ONNX type, which is what the
    # passes expect (graph_passes.fp8 writes them, quietly too); the user has nothing to act on
    with G_LOGGER.suppress(G_LOGGER.ERROR):
        return gs.import_onnx(model)


def to_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """Export a gs graph with the function bodies of exactly the export_engine ops it uses."""
    from exporter.onnx_ops import DOMAIN, DOMAIN_VERSION, functions_for

    for t in graph.tensors().values():  # weights still in the source file: read them now
        if isinstance(t, gs.Constant) and isinstance(t._values, _ExternalValues):  # noqa: SLF001
            t.values = t._values.load()  # noqa: SLF001
    model = gs.export_onnx(graph, do_type_check=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    # keep the bodies the graph came with; add those of ops a pass introduced; drop unused ones
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {f.name: f for f in model.functions if f.domain == DOMAIN and f.name in used}
    missing = [f for f in functions_for(model.graph, opset) if f.name not in have]
    # other domains' functions a pass added (native_fp4's trt::TRT_FP4DynamicQuantize), if used
    called = {(n.domain, n.op_type) for n in model.graph.node}
    others = [f for f in model.functions if f.domain != DOMAIN and (f.domain, f.name) in called]
    del model.functions[:]
    model.functions.extend(sorted(list(have.values()) + missing, key=lambda f: f.name) + others)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    model.ir_version = 10
    return model


def save_graph(graph: gs.Graph, path: str | Path, finish: Callable[[onnx.ModelProto], onnx.ModelProto]
               = lambda m: m, external_data: bool | None = None) -> Path | None:
    """Save ``graph`` atomically (``finish`` edits the small model proto last); returns the data
    file when one was written (``external_data=None``: above 2 GB of weights).

    Large weights are streamed into the data file one tensor at a time and never held twice
    (numpy array and protobuf copy): writing SDXL's 5 GB reference target that way needs no more
    memory than the passes did."""
    from exporter.atomic import EXTERNAL_DATA_THRESHOLD, atomic_onnx

    external = initializer_bytes(graph) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    with atomic_onnx(path) as (tmp, data_name):
        if external:
            _stream_weights(graph, tmp.with_name(data_name), data_name)
        onnx.save_model(finish(to_onnx(graph)), tmp)
    return Path(path).with_name(data_name) if external else None


def _stream_weights(graph: gs.Graph, data_path: Path, location: str) -> None:
    """Write each constant over 1 KiB to ``data_path`` and leave in the graph only a tensor proto
    that points there (gs exports such a proto as it is)."""
    from onnx.external_data_helper import set_external_data
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    with open(data_path, "wb") as f:
        for t in graph.tensors().values():
            if not isinstance(t, gs.Constant) or _nbytes(t) <= 1024:
                continue
            if isinstance(t._values, _ExternalValues):  # noqa: SLF001
                t.values = t._values.load()  # noqa: SLF001
            proto = OnnxExporter.export_tensor_proto(t)
            if not proto.HasField("raw_data"):
                continue
            if len(proto.raw_data) >= 1 << 20:  # page-aligned, so a runtime may map it
                f.write(b"\0" * (-f.tell() % 4096))
            offset = f.tell()
            f.write(proto.raw_data)
            set_external_data(proto, location, offset, f.tell() - offset)
            proto.ClearField("raw_data")
            proto.data_location = onnx.TensorProto.EXTERNAL
            t._values = LazyValues(proto)  # noqa: SLF001


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


def peak_rss_gib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


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
                         initializer_bytes(graph), seconds, peak_rss_gib())
        records.append(rec)
        (log.debug if quiet else log.info)(rec.line())
    return records
