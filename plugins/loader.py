"""Locate (or build) the native plugin libraries and register them with TensorRT.

    from plugins import loader
    lib = loader.load_plugin()          # "FP4Gemm" (namespace export_engine, version 1) registered
                                        # with `tensorrt`, else `tensorrt_rtx`
    kernels = loader.load_kernels()     # ctypes bindings of the CUDA kernels' C API (no TensorRT)

Where the libraries come from, first match wins:
  1. $FP4GEMM_PLUGIN_LIB / $FP4GEMM_KERNEL_LIB (a path to the .so);
  2. a CMake build in build/plugins (``cmake -S plugins -B build/plugins && cmake --build build/plugins``);
  3. otherwise, with ``build_if_missing`` (the default), a build with nvcc alone into a cache
     directory (plugins/fp4_gemm/build.py) for the current GPU's architecture, or for all of
     sm_80/86/89/90a when there is none. The plugin needs TensorRT's headers for that:
     $TensorRT_INCLUDE_DIR, $TENSORRT_ROOT/include or third_party/TensorRT/include.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
CMAKE_BUILD_DIR = REPO / "build" / "plugins"
PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE = "FP4Gemm", "1", "export_engine"
#: Python modules of TensorRT, in order of preference
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")
#: their runtime libraries (the plugin resolves getPluginRegistry/getLogger against them)
RUNTIME_LIBRARIES = ("libnvinfer.so", "libtensorrt_rtx.so")


class PluginLoadError(RuntimeError):
    """The plugin could not be found, built, loaded or registered; the message says which."""


def find_library(name: str) -> Path | None:
    """``lib<name>.so`` from the environment or a CMake build (None when neither has it)."""
    env = {"fp4gemm_plugin": "FP4GEMM_PLUGIN_LIB", "fp4gemm_kernels": "FP4GEMM_KERNEL_LIB"}.get(name)
    if env and os.environ.get(env):
        path = Path(os.environ[env])
        if not path.exists():
            raise PluginLoadError(f"${env} points to {path}, which does not exist")
        return path
    for candidate in (CMAKE_BUILD_DIR / "fp4_gemm" / f"lib{name}.so",
                      REPO / "plugins" / "fp4_gemm" / f"lib{name}.so"):
        if candidate.exists():
            return candidate
    return None


def _device_archs() -> Sequence[str]:
    """The current GPU's architecture ("90a" for sm_90), or every supported one without a GPU."""
    from plugins.fp4_gemm import build

    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return ("90a",) if (major, minor) == (9, 0) else (f"{major}{minor}",)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return build.ARCHS


def kernel_library_path(build_if_missing: bool = True) -> Path:
    """Path of libfp4gemm_kernels.so (found, else built)."""
    path = find_library("fp4gemm_kernels")
    if path is None:
        if not build_if_missing:
            raise PluginLoadError("libfp4gemm_kernels.so not found: build it with CMake (plugins/README) "
                                  "or set FP4GEMM_KERNEL_LIB")
        from plugins.fp4_gemm import build

        try:
            path = build.build_kernel_library(archs=_device_archs())
        except build.BuildError as err:
            raise PluginLoadError(f"building the FP4Gemm kernels failed: {err}") from err
    return path


def plugin_library_path(build_if_missing: bool = True) -> Path:
    """Path of libfp4gemm_plugin.so (found, else built against TensorRT's headers)."""
    path = find_library("fp4gemm_plugin")
    if path is None:
        if not build_if_missing:
            raise PluginLoadError("libfp4gemm_plugin.so not found: build it with CMake (set TENSORRT_ROOT) "
                                  "or set FP4GEMM_PLUGIN_LIB")
        from plugins.fp4_gemm import build

        include = build.find_tensorrt_include()
        if include is None:
            raise PluginLoadError(
                "libfp4gemm_plugin.so not found and TensorRT's headers (NvInfer.h) are missing: set "
                "TensorRT_INCLUDE_DIR or TENSORRT_ROOT (TensorRT's tar/deb packages ship them; so does "
                "the public NVIDIA/TensorRT repository's include/)")
        try:
            path = build.build_plugin_library(include, archs=_device_archs())
        except build.BuildError as err:
            raise PluginLoadError(f"building the FP4Gemm plugin failed: {err}") from err
    return path


def load_kernels(build_if_missing: bool = True):
    """ctypes bindings (plugins.fp4_gemm.kernels.KernelLibrary) of the kernel library."""
    from plugins.fp4_gemm.kernels import KernelLibrary

    return KernelLibrary(kernel_library_path(build_if_missing))


def tensorrt_module(names: Sequence[str] = TENSORRT_MODULES) -> ModuleType:
    """The first importable TensorRT Python module of ``names``."""
    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as err:
            errors.append(f"{name}: {err}")
    raise PluginLoadError("no TensorRT Python module could be imported (" + "; ".join(errors) + ")")


def _loaded_runtime_library() -> Path | None:
    """The TensorRT runtime library the Python module loaded (from /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # pragma: no cover - not Linux
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if any(Path(path).name.startswith(lib) for lib in RUNTIME_LIBRARIES):
            return Path(path)
    return None


def _make_runtime_global(trt: ModuleType) -> None:
    """Re-open TensorRT's runtime with RTLD_GLOBAL so the plugin's undefined TensorRT symbols
    resolve against the instance (and the plugin registry) the Python module uses."""
    path = _loaded_runtime_library()
    if path is None:
        raise PluginLoadError(f"{trt.__name__} is imported but its runtime library (one of "
                              f"{', '.join(RUNTIME_LIBRARIES)}) is not mapped in this process")
    mode = ctypes.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0)
    ctypes.CDLL(str(path), mode=mode)


def get_creator(trt: ModuleType):
    """The registered FP4Gemm creator, or None."""
    return trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)


def load_plugin(trt: ModuleType | None = None, library: str | Path | None = None,
                build_if_missing: bool = True) -> ctypes.CDLL:
    """Load libfp4gemm_plugin.so into this process and make sure TensorRT's registry holds the
    FP4Gemm creator under namespace "export_engine" (what the ONNX parser looks up for the
    nodes' plugin_namespace attribute). Returns the loaded library (it also exports the C API of
    fp4gemm.h). Safe to call more than once.

    With ``tensorrt_rtx`` the creator registers and creates plugins, but TensorRT-RTX networks
    hold no plugin layers (1.7.1: its ONNX parser aborts the process on an FP4Gemm node once the
    plugin is registered); leave the plugin unloaded there and the parser inlines the node's
    function body instead."""
    trt = trt or tensorrt_module()
    if trt.__name__.startswith("tensorrt_rtx"):
        warnings.warn("FP4Gemm plugin registered with TensorRT-RTX, whose networks take no plugin layers: "
                      "parsing FP4Gemm nodes now aborts; build without the plugin to use the function body",
                      RuntimeWarning, stacklevel=2)
    path = Path(library) if library else plugin_library_path(build_if_missing)
    _make_runtime_global(trt)
    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise PluginLoadError(f"loading {path} failed: {err}") from err
    if get_creator(trt) is None:
        lib.export_engine_register_fp4gemm.restype = ctypes.c_int
        lib.export_engine_register_fp4gemm()
    if get_creator(trt) is None:
        raise PluginLoadError(f"{path} loaded but {trt.__name__}'s plugin registry has no creator "
                              f"{PLUGIN_NAME} v{PLUGIN_VERSION} in namespace {PLUGIN_NAMESPACE!r}")
    return lib


def trtexec_flags(build_if_missing: bool = True) -> list[str]:
    """The trtexec arguments that load the plugin: ``--staticPlugins=<path>``."""
    return [f"--staticPlugins={plugin_library_path(build_if_missing)}"]
