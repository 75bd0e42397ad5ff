"""Parity harness: the exported ONNX in ONNX Runtime (CPU) against the PyTorch quantized model.

Whole model: both run the same inputs; the report gives max abs error and relative L2.
Layer by layer: the model is exported with debug outputs (every quantized layer's activation
quantizer input ``<layer>.a_in``, its codes ``<layer>.codes`` and the layer output ``<layer>.out``),
so each layer is compared on the *same input*: PyTorch quantizes ONNX Runtime's ``a_in`` and runs
the layer on it. Codes can only differ where fp32 evaluation order moved a value across a
rounding midpoint upstream of the division, so the fraction of differing codes is reported too.

End to end on many inputs: :func:`end_to_end` and :func:`judge_end_to_end` (the criterion
``export-engine verify`` applies; docs/parity.md). Used by the tests and by ``export-engine verify``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .layers import QuantConv2d, QuantLinear, quant_layers
from .quantizers import nvfp4_block_scale


@dataclass
class Diff:
    """max |a - b|, ||a - b|| / ||b|| (b is the reference) and the number of values."""

    max_abs: float
    rel_l2: float
    size: int


def diff(got: np.ndarray, ref: np.ndarray) -> Diff:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape mismatch: {got.shape} vs reference {ref.shape}")
    d = got - ref
    denom = np.linalg.norm(ref)
    rel = float(np.linalg.norm(d) / denom) if denom > 0 else float(np.linalg.norm(d))
    return Diff(float(np.abs(d).max()) if d.size else 0.0, rel, int(d.size))


@dataclass
class LayerParity:
    """One quantized layer on the same input in ONNX Runtime and PyTorch."""

    name: str
    codes_differ: int  # activation codes that differ
    codes_total: int
    out: Diff

    @property
    def codes_differ_fraction(self) -> float:
        return self.codes_differ / self.codes_total if self.codes_total else 0.0


@dataclass
class ParityReport:
    whole: Diff
    layers: list[LayerParity] = field(default_factory=list)

    @property
    def worst_codes_fraction(self) -> float:
        return max((l.codes_differ_fraction for l in self.layers), default=0.0)

    @property
    def codes_differ_fraction(self) -> float:
        total = sum(l.codes_total for l in self.layers)
        return sum(l.codes_differ for l in self.layers) / total if total else 0.0

    def summary(self) -> str:
        lines = [f"whole model: max abs {self.whole.max_abs:.3e}, rel L2 {self.whole.rel_l2:.3e}"]
        if self.layers:
            worst = max(self.layers, key=lambda l: l.out.rel_l2)
            lines.append(
                f"{len(self.layers)} layers: codes differ {self.codes_differ_fraction:.2e} overall, "
                f"worst layer {self.worst_codes_fraction:.2e}; worst layer output rel L2 "
                f"{worst.out.rel_l2:.3e} ({worst.name})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"whole": asdict(self.whole), "layers": [
            {"name": l.name, "codes_differ": l.codes_differ, "codes_total": l.codes_total,
             "codes_differ_fraction": l.codes_differ_fraction, **{f"out_{k}": v for k, v in asdict(l.out).items()}}
            for l in self.layers]}


def ort_session(onnx_path: str | Path, threads: int | None = None, optimize: bool = False):
    """An ONNX Runtime CPU session; graph optimizations off (the graph as written) unless
    ``optimize`` (ORT's extended fusions, which reorder float arithmetic).

    Sessions are cached per file (path, size, mtime): a big graph takes a while to load and the
    harness runs it at several timesteps."""
    st = Path(onnx_path).stat()
    return _cached_session(str(Path(onnx_path).resolve()), st.st_size, st.st_mtime_ns, threads, optimize)


@functools.lru_cache(maxsize=4)
def _cached_session(path: str, size: int, mtime_ns: int, threads: int | None, optimize: bool = False):
    return new_session(path, threads, optimize)


def new_session(path: str | Path, threads: int | None = None, optimize: bool = False):
    """An uncached :func:`ort_session`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session_or_path, inputs: Mapping[str, torch.Tensor | np.ndarray],
             outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run the model; returns output name -> array (all outputs unless ``outputs`` is given)."""
    sess = session_or_path if hasattr(session_or_path, "run") else ort_session(session_or_path)
    feeds = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
             for k, v in inputs.items()}
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def torch_act_codes(layer, a_in: torch.Tensor) -> torch.Tensor:
    """PyTorch's codes for the activation quantizer input ``a_in`` of ``layer`` (as fake_quantize)."""
    q = layer.a_quant
    if q.mode == "dynamic":
        scale, zp = q.dynamic_params(a_in)
    elif q.mode == "nvfp4":
        scale, zp = nvfp4_block_scale(a_in, q.scale.detach()), None
    else:
        scale, zp = q.scale.detach().float(), (None if q.fmt.signed else q.zero_point.detach().float())
    xf = a_in.float()
    u = xf / scale if zp is None else (xf - zp) / scale
    return q.fmt.encode_torch(u)


def torch_layer_from_act_input(layer, a_in: torch.Tensor) -> torch.Tensor:
    """The layer's output when its activation quantizer sees ``a_in`` (after any smoothing). A
    float32 ``a_in`` of a 16-bit layer is quantized as it is, then dequantized to the layer's
    dtype, as the graph's DequantizeFP does."""
    w = layer.quantized_weight()
    x = layer.a_quant(a_in).to(w.dtype)
    if isinstance(layer, QuantLinear):
        return F.linear(x, w, layer.bias)
    if isinstance(layer, QuantConv2d):
        return F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    raise TypeError(f"unsupported layer {type(layer).__name__}")


def _set_torch_adapter(model, adapter_table, timestep) -> None:
    from .export import select_adapter, talora_selections

    if adapter_table is not None and timestep is not None and talora_selections(model):
        select_adapter(model, adapter_table, timestep)


def parity(model: torch.nn.Module, onnx_path: str | Path, inputs: Mapping[str, torch.Tensor], *,
           call=None, adapter_table: torch.Tensor | None = None, timestep_input: str = "timestep",
           layers: bool | None = None, output: str | None = None) -> ParityReport:
    """Run ``onnx_path`` (or an ONNX Runtime session) and ``model`` in PyTorch on ``inputs``; compare.

    ``call(model, *inputs.values())`` runs the PyTorch model (default ``model(*inputs)``); TALoRA
    models use ``adapter_table`` (or the one they carry) for the timestep, as the graph does.
    ``layers``: compare layer by layer too; needs an export with ``debug_outputs=True`` (default:
    when the ONNX has such outputs).
    """
    from .export import _talora_hooks_detached, find_adapter_table

    call = call or (lambda m, *a: m(*a))
    sess = onnx_path if hasattr(onnx_path, "run") else ort_session(onnx_path)
    out_names = [o.name for o in sess.get_outputs()]
    main = output or out_names[0]
    got = run_onnx(sess, inputs)
    table = adapter_table if adapter_table is not None else find_adapter_table(model)
    _set_torch_adapter(model, table, inputs.get(timestep_input))
    with torch.no_grad(), _talora_hooks_detached(model):
        ref = call(model, *inputs.values())
    report = ParityReport(diff(got[main], ref.float().numpy()))
    if layers is None:
        layers = any(n.endswith(".codes") for n in out_names)
    if layers:
        report.layers = _layer_parity(model, got)
    return report


def _layer_parity(model, got: Mapping[str, np.ndarray]) -> list[LayerParity]:
    rows = []
    with torch.no_grad():
        for name, layer in quant_layers(model):
            if f"{name}.a_in" not in got:
                continue
            # float32 in a 16-bit graph too: the value the quantizer read (exporter.export._expose_layers)
            a_in = torch.from_numpy(got[f"{name}.a_in"])
            codes = torch_act_codes(layer, a_in).numpy()
            differ = int((codes != got[f"{name}.codes"].view(np.uint8)).sum())
            out = torch_layer_from_act_input(layer, a_in).float().numpy()
            rows.append(LayerParity(name, differ, int(codes.size), diff(got[f"{name}.out"], out)))
    return rows


def layer_onnx_vs_reference_evaluator(onnx_path: str | Path,
                                      inputs: Mapping[str, np.ndarray]) -> dict[str, Diff]:
    """One (small) model in ONNX Runtime vs ``onnx.reference.ReferenceEvaluator``, per output."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(onnx_path))
    ref = ReferenceEvaluator(model)
    names = [o.name for o in model.graph.output]
    feeds = {k: np.asarray(v) for k, v in inputs.items()}
    want = dict(zip(names, ref.run(None, feeds)))
    got = run_onnx(onnx_path, feeds)
    return {n: diff(got[n], want[n]) for n in names}


def parity_at_timesteps(model, onnx_path, inputs: Mapping[str, torch.Tensor],
                        timesteps: Sequence[float], **kwargs) -> dict[float, ParityReport]:
    """:func:`parity` at several timesteps (different TALoRA adapters), same other inputs."""
    out = {}
    for t in timesteps:
        feeds = dict(inputs)
        feeds["timestep"] = torch.tensor(float(t), dtype=inputs["timestep"].dtype)
        out[float(t)] = parity(model, onnx_path, feeds, **kwargs)
    return out


# ---- end to end: a runtime against PyTorch, measured by the quantization error itself ------------
#
# A static 4-bit activation quantizer is discontinuous: where fp32 evaluation order moves a value
# across a rounding midpoint, one code flips by a whole step, and the layers after it carry the
# change on until it is as large as the model's own quantization noise (docs/parity.md measures
# this). So one input, compared at 1e-3, passes or fails by luck. The criterion below compares
# on many inputs, each against the quantization error e_q = ||torch_q - fp||:
#   quality     sum ||runtime - fp||^2 / sum ||torch_q - fp||^2 within 1 +- QUALITY_TOL:
#               the runtime is as accurate as the PyTorch quantized model, no better, no worse;
#   divergence  ||runtime - torch_q|| <= DIVERGENCE_TOL * e_q on every input: rounding chaos
#               gives another model of the same noise, about 0.5 e_q away, never more than e_q.
#               A 16-bit runtime or an engine rounds almost every activation differently from
#               PyTorch, so its noise is a nearly independent draw (0.77-1.03 e_q measured on
#               the fp16 sdxl-tiny export): two independent draws of the same size are
#               sqrt(2) e_q apart, the limit there (DIVERGENCE_TOL_LOW_PRECISION); bugs are
#               caught by quality and, layer by layer, by verify's per-layer checks;
#   agreement   (fp32 runtimes only) for every TALoRA adapter, some inputs routed to it match
#               PyTorch to AGREE_REL: a flip is a rare event at verify's small shapes, a bug
#               (wrong scale, wrong adapter, missing LoRA) is systematic and hits every input.
QUALITY_TOL = 0.05
DIVERGENCE_TOL = 1.0
AGREE_REL = 1e-4
#: a 16-bit graph or an engine (module comment above): its noise is a new draw, and 12 draws'
#: energy varies by a few percent (plugin quality 0.955 to 1.01 on one fp16 sdxl-tiny export)
LOW_PRECISION_QUALITY_TOL = 0.10
DIVERGENCE_TOL_LOW_PRECISION = math.sqrt(2.0)


@dataclass
class E2ESample:
    """One input (seed, timestep) of the end-to-end comparison; norms are L2 over the output."""

    seed: int
    timestep: float
    adapter: int | None
    quant_err: float  # ||torch_q - fp||: the quantization error itself
    runtime_err: float  # ||runtime - fp||
    divergence: float  # ||runtime - torch_q||
    norm: float  # ||torch_q||

    @property
    def rel_divergence(self) -> float:
        return self.divergence / self.norm if self.norm > 0 else self.divergence

    @property
    def agrees(self) -> bool:
        return self.rel_divergence <= AGREE_REL


@dataclass
class Check:
    """One named check of a criterion: its value against its limit, and where it failed."""

    name: str
    passed: bool
    value: float
    limit: str
    where: str = ""

    def line(self) -> str:
        return f"{self.name}: {'ok' if self.passed else 'FAILED'} ({self.value:.4g}, limit {self.limit})" + \
            (f" at {self.where}" if self.where and not self.passed else "")


def judge_end_to_end(samples: Sequence[E2ESample], exact: bool = True) -> list[Check]:
    """The end-to-end criterion (module comment above) on one target's samples. ``exact``: the
    runtime reproduces PyTorch's arithmetic (fp32 ONNX Runtime); else (an fp16 graph, an engine)
    the low-precision limits apply and there is no agreement check."""
    quality_tol = QUALITY_TOL if exact else LOW_PRECISION_QUALITY_TOL
    divergence_tol = DIVERGENCE_TOL if exact else DIVERGENCE_TOL_LOW_PRECISION
    q = sum(s.quant_err ** 2 for s in samples)
    r = sum(s.runtime_err ** 2 for s in samples)
    ratio = r / q if q > 0 else (1.0 if r == 0 else float("inf"))
    checks = [Check("quality", abs(ratio - 1) <= quality_tol, ratio, f"1 +- {quality_tol:g}",
                    "the whole sample set")]
    worst = max(samples, key=lambda s: s.divergence / max(s.quant_err, 1e-30))
    d = worst.divergence / max(worst.quant_err, 1e-30)
    checks.append(Check("divergence", d <= divergence_tol, d, f"{divergence_tol:.3g} x quantization error",
                        f"seed {worst.seed}, t={worst.timestep:g}"))
    if exact:
        groups: dict = {}
        for s in samples:
            groups.setdefault(s.adapter, []).append(s)
        bad = [a for a, g in groups.items() if not any(s.agrees for s in g)]
        share = sum(s.agrees for s in samples) / len(samples)
        where = ", ".join("every input" if a is None else f"adapter {a}" for a in bad)
        checks.append(Check("agreement", not bad, share, f"an input within {AGREE_REL:g} per adapter", where))
    return checks


def e2e_timesteps(table: torch.Tensor | None, n: int, num_train_timesteps: int = 1000) -> list[float]:
    """``n`` timesteps spread over [T-1, 0], plus the middle timestep of every TALoRA adapter none of
    them reaches, so each adapter is exercised (descending order)."""
    top = num_train_timesteps - 1
    ts = [float(round(top - i * top / max(n - 1, 1))) for i in range(n)] if n > 1 else [float(top)]
    if table is not None:
        seen = {int(table[int(t)]) for t in ts}
        for a in sorted(set(table.tolist()) - seen):
            idx = (table == a).nonzero()[:, 0]
            ts.append(float(idx[len(idx) // 2]))
    return sorted(set(ts), reverse=True)


@contextlib.contextmanager
def quantization_off(model: torch.nn.Module):
    """The model's float counterpart: every quantizer off (LoRA deltas and smoothing stay, so the
    difference to the quantized model is exactly its quantization error)."""
    layers = [layer for _, layer in quant_layers(model)]
    saved = [(l.w_quant.enabled, l.a_quant.enabled) for l in layers]
    for l in layers:
        l.w_quant.enabled = l.a_quant.enabled = False
    try:
        yield model
    finally:
        for l, (w, a) in zip(layers, saved):
            l.w_quant.enabled, l.a_quant.enabled = w, a


def end_to_end(model: torch.nn.Module, runners: Mapping[str, object], feeds: Sequence[tuple[int, dict]],
               call=None, adapter_table: torch.Tensor | None = None) -> dict[str, list[E2ESample]]:
    """Run PyTorch (quantized and float) and every runner (``feeds -> np.ndarray``) on each
    ``(seed, feeds)``; returns target -> samples. TALoRA adapters follow the timestep, as in the graph."""
    from .export import _talora_hooks_detached, adapter_index, find_adapter_table, unet_call

    call = call or unet_call
    table = adapter_table if adapter_table is not None else find_adapter_table(model)
    torch_out = []  # PyTorch first, then one runner at a time: one big graph in memory at once
    for _, f in feeds:
        _set_torch_adapter(model, table, f["timestep"])
        with torch.no_grad(), _talora_hooks_detached(model):
            tq = call(model, *f.values()).double().numpy()
            with quantization_off(model):
                fp = call(model, *f.values()).double().numpy()
        torch_out.append((tq, fp, None if table is None else int(adapter_index(table, f["timestep"]))))
    out: dict[str, list[E2ESample]] = {name: [] for name in runners}
    for name, run in runners.items():
        for (seed, f), (tq, fp, adapter) in zip(feeds, torch_out):
            got = np.asarray(run(f), np.float64)
            out[name].append(E2ESample(seed, float(f["timestep"]), adapter,
                                       float(np.linalg.norm(tq - fp)), float(np.linalg.norm(got - fp)),
                                       float(np.linalg.norm(got - tq)), float(np.linalg.norm(tq))))
        if hasattr(run, "close"):
            run.close()
    return out


def onnx_runner(session_or_path):
    """feeds -> the graph's first output, for :func:`end_to_end`."""
    return lambda feeds: next(iter(run_onnx(session_or_path, feeds).values()))


class LoadedWhileRunning:
    """An :func:`end_to_end` runner that loads its graph at the first call and lets it go when
    the runner is done (``close``), outside the session cache: a full SDXL graph takes several GB
    in ONNX Runtime, and verify runs two of them next to the PyTorch model."""

    def __init__(self, path: str | Path, optimize: bool = False):
        self.path, self.optimize, self.session = path, optimize, None

    def __call__(self, feeds):
        if self.session is None:
            self.session = new_session(self.path, optimize=self.optimize)
        return onnx_runner(self.session)(feeds)

    def close(self) -> None:
        self.session = None
