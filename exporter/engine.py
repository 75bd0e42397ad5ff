"""TensorRT engine building, with either ``tensorrt`` or ``tensorrt_rtx``.

``tensorrt`` (full TensorRT) builds for the GPU it runs on. ``tensorrt_rtx`` builds ahead of time
for named compute capabilities and works without a GPU (see ../shared/FIELD_NOTES.md), so the
tests build real engines on CPU-only machines. Custom-domain nodes with model-local functions
(our QuantizeFP / DequantizeFP) are inlined by the ONNX parser.
"""
from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Mapping, Sequence

from .atomic import atomic_path

#: (min, opt, max) shape per input name
Profile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build; the message carries the parser / builder errors."""


def load_tensorrt(prefer: str | None = None) -> ModuleType:
    """The TensorRT Python module: ``tensorrt`` or ``tensorrt_rtx`` (``prefer`` picks one).

    Raises ImportError naming both packages when neither is installed.
    """
    from plugins.loader import TENSORRT_MODULES, PluginLoadError, tensorrt_module

    try:
        return tensorrt_module([prefer] if prefer else TENSORRT_MODULES)
    except PluginLoadError as err:
        raise ImportError(f"{err}; install TensorRT-RTX (pip install tensorrt-rtx-cu13) or "
                          "TensorRT from NVIDIA") from None


def is_rtx(trt: ModuleType) -> bool:
    return trt.__name__.startswith("tensorrt_rtx")


def compute_capability(trt: ModuleType, sm: int | str):
    """``trt.ComputeCapability.SM89`` from 89 / "89" / "sm89" / "8.9"."""
    text = str(sm).lower().replace("sm_", "").replace("sm", "").replace(".", "")
    try:
        return getattr(trt.ComputeCapability, f"SM{int(text)}")
    except (ValueError, AttributeError):
        known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
        raise ValueError(f"compute capability {sm!r} is not one {trt.__name__} builds for "
                         f"({', '.join(known)})") from None


@dataclass
class BuildResult:
    engine_path: Path
    seconds: float
    engine_bytes: int
    module: str
    sm: str | None
    warnings: list[str] = field(default_factory=list)
    #: the builder's per-engine-layer lines (exporter.engine_report parses them)
    layer_lines: list[str] = field(default_factory=list)


def _logger(trt: ModuleType, quiet: bool):
    """A logger that prints warnings and errors (errors only with quiet) and keeps the verbose
    per-layer lines the builder prints after a build (``Name: ..., LayerType: ...``): the only
    record, without a GPU to deserialize the engine on, of which layers run in which precision."""
    from .engine_report import is_layer_line

    show = trt.Logger.ERROR if quiet else trt.Logger.WARNING

    class LayerLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.layer_lines: list[str] = []

        def log(self, severity, msg):
            if "LayerType: " in msg:  # one message holds all of them, a line each
                self.layer_lines.extend(line for line in msg.splitlines() if is_layer_line(line))
            elif int(severity) <= int(show):
                print(f"[{trt.__name__}] {msg}", flush=True)

    return LayerLogger()


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, sm: int | str | None = None,
                 profiles: Sequence[Profile] | Profile | None = None, plugin_libs: Sequence[str] = (),
                 timing_cache: str | os.PathLike | None = None, quiet: bool = False,
                 fp16: bool = False, optimization_level: int | None = None,
                 trt_module: str | None = None) -> BuildResult:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path`` (atomically).

    ``sm``: compute capability to build for (tensorrt_rtx only; required there when no GPU
    is present, e.g. 89). ``profiles``: one or more {input: (min, opt, max)} for dynamic inputs
    (inputs left out must be static). ``plugin_libs``: shared libraries to load first (their
    plugins register themselves). ``timing_cache``: file read if present and written back.
    ``fp16``: allow fp16 kernels (full TensorRT; RTX decides precision from the graph's types).
    ``optimization_level``: builder optimization level 0..5 (lower builds faster; None: default).
    """
    trt = load_tensorrt(trt_module)
    start = time.time()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist")
    for lib in plugin_libs:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    logger = _logger(trt, quiet)
    if not is_rtx(trt):
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external data next to the model
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{trt.__name__} could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer lines with ONNX names
    sm_name = None
    if sm is not None:
        if not is_rtx(trt):
            raise ValueError("sm= needs tensorrt_rtx; full TensorRT builds for the GPU it runs on")
        config.num_compute_capabilities = 1
        cc = compute_capability(trt, sm)
        config.set_compute_capability(cc, 0)
        sm_name = cc.name
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if fp16 and not is_rtx(trt):
        config.set_flag(trt.BuilderFlag.FP16)
    for profile in _profiles(network, profiles):
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.items():
            opt.set_shape(name, tuple(lo), tuple(mid), tuple(hi))
        config.add_optimization_profile(opt)
    cache_bytes = None
    if timing_cache is not None and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    if timing_cache is not None:
        cache = config.create_timing_cache(cache_bytes or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{trt.__name__} failed to build an engine from {onnx_path}"
                               + (f" for {sm_name}" if sm_name else "") + " (see the log above)")
    del parser, network  # the parsed weights: an SDXL engine is 5 GB, and so are they
    engine_path = Path(engine_path)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(memoryview(serialized))  # no Python copy of the engine
    nbytes = serialized.nbytes
    del serialized
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return BuildResult(engine_path, time.time() - start, nbytes, trt.__name__, sm_name,
                       layer_lines=logger.layer_lines)


def _profiles(network, profiles) -> list[dict]:
    """Normalise ``profiles``; dynamic inputs without one get an error that names them."""
    if profiles is None:
        profiles = []
    elif isinstance(profiles, Mapping):
        profiles = [profiles]
    profiles = [dict(p) for p in profiles]
    dynamic = [network.get_input(i) for i in range(network.num_inputs)
               if any(d < 0 for d in network.get_input(i).shape)]
    for profile in profiles or [{}]:
        missing = [t.name for t in dynamic if t.name not in profile]
        if missing:
            raise ValueError(f"inputs {missing} have dynamic shapes: give each a (min, opt, max) "
                             "shape in profiles=")
    return profiles


def unet_profile(batch: tuple[int, int, int], latent: tuple[int, int, int], text_len: tuple[int, int, int],
                 in_channels: int, context_dim: int, text_embeds_dim: int | None = None) -> dict:
    """A {input: (min, opt, max)} profile for an exported UNet (see exporter.export)."""
    def dims(*per):  # per: tuple of (lo, opt, hi) or int per axis
        return tuple(tuple(p[i] if isinstance(p, tuple) else p for p in per) for i in range(3))

    profile = {
        "sample": dims(batch, in_channels, latent, latent),
        "encoder_hidden_states": dims(batch, text_len, context_dim),
    }
    if text_embeds_dim is not None:
        profile["text_embeds"] = dims(batch, text_embeds_dim)
        profile["time_ids"] = dims(batch, 6)
    return profile
