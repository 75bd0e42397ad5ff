"""ctypes bindings of the FP4Gemm C API (fp4gemm.h), for tests and benchmarks.

    lib = KernelLibrary(path)                       # plugins.loader.load_kernels() finds/builds it
    layer = layer_from_attrs(attrs)                 # the FP4Gemm node's attributes
    plan = lib.make_plan(layer, max_m, DTYPE_F16)   # sm_version/num_sms: 0 = current device
    lib.run(layer, problem, plan, workspace_ptr, workspace_bytes, semaphores_ptr, stream_ptr)

Pointers are plain integers (e.g. ``torch.Tensor.data_ptr()``); nothing here needs torch.
"""
from __future__ import annotations

import ctypes
from ctypes import POINTER, c_char_p, c_int, c_int32, c_int64, c_size_t, c_void_p
from pathlib import Path
from typing import Mapping

MAX_GROUPS = 16
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
PATH_AUTO, PATH_SIMT, PATH_SMALLM, PATH_MMA, PATH_WGMMA = 0, 1, 2, 3, 4
PATHS = {"auto": PATH_AUTO, "simt": PATH_SIMT, "smallm": PATH_SMALLM, "mma": PATH_MMA,
         "wgmma": PATH_WGMMA}
OK, ERR_INVALID_LAYER, ERR_INVALID_PROBLEM, ERR_WORKSPACE, ERR_UNSUPPORTED, ERR_CUDA = range(6)
#: bits of the flags word (fp4gemm_flags_address)
FLAG_FP8, FLAG_INEXACT16, FLAG_BAD_ADAPTER, FLAG_BAD_PERM = 1, 2, 4, 8


class Layer(ctypes.Structure):
    _fields_ = [("in_features", c_int32), ("out_features", c_int32), ("num_groups", c_int32),
                ("group_bits", c_int32 * MAX_GROUPS), ("group_sizes", c_int32 * MAX_GROUPS),
                ("a_signed", c_int32), ("a_ebits", c_int32), ("a_mbits", c_int32),
                ("a_bias", c_int32), ("a_max_code", c_int32), ("a_mode", c_int32)]


class Problem(ctypes.Structure):
    _fields_ = [("M", c_int64), ("dtype", c_int32), ("num_adapters", c_int32), ("x", c_void_p),
                ("w", c_void_p), ("w_scale", c_void_p), ("w_lut", c_void_p), ("a_scale", c_void_p),
                ("a_zero", c_void_p), ("bias", c_void_p), ("perm", c_void_p), ("adapter", c_void_p),
                ("adapter_is_int32", c_int32), ("y", c_void_p)]


class Plan(ctypes.Structure):
    _fields_ = [("path", c_int32), ("fp8", c_int32), ("split_k", c_int32), ("sm_version", c_int32),
                ("num_sms", c_int32), ("max_m", c_int64), ("forced", c_int32)]

    def __repr__(self) -> str:
        return (f"Plan(path={self.path}, fp8={self.fp8}, split_k={self.split_k}, "
                f"sm={self.sm_version}, sms={self.num_sms}, max_m={self.max_m}, forced={self.forced})")


def layer_from_attrs(attrs: Mapping) -> Layer:
    """The C layer description of an FP4Gemm node's attributes (exporter.onnx_ops.fp4gemm_attrs)."""
    bits, sizes = list(attrs["group_bits"]), list(attrs["group_sizes"])
    if len(bits) > MAX_GROUPS:
        raise ValueError(f"{len(bits)} weight groups; the kernels take at most {MAX_GROUPS}")
    layer = Layer()
    layer.in_features, layer.out_features = int(attrs["in_features"]), int(attrs["out_features"])
    layer.num_groups = len(bits)
    for i, (b, s) in enumerate(zip(bits, sizes)):
        layer.group_bits[i], layer.group_sizes[i] = int(b), int(s)
    for name in ("a_signed", "a_ebits", "a_mbits", "a_bias", "a_max_code", "a_mode"):
        setattr(layer, name, int(attrs[name]))
    return layer


class Fp4GemmError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class KernelLibrary:
    """The loaded libfp4gemm_kernels.so (or the plugin library, which exports the same API)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        L = self.lib
        L.fp4gemm_check_layer.argtypes = [POINTER(Layer)]
        L.fp4gemm_check_layer.restype = c_int
        L.fp4gemm_adapter_bytes.argtypes = [POINTER(Layer)]
        L.fp4gemm_adapter_bytes.restype = c_int64
        L.fp4gemm_make_plan.argtypes = [POINTER(Layer), c_int64, c_int32, c_int32, c_int32, c_int32,
                                        POINTER(Plan)]
        L.fp4gemm_make_plan.restype = c_int
        L.fp4gemm_workspace_size.argtypes = [POINTER(Layer), POINTER(Plan)]
        L.fp4gemm_workspace_size.restype = c_size_t
        L.fp4gemm_semaphore_count.argtypes = [POINTER(Layer), POINTER(Plan)]
        L.fp4gemm_semaphore_count.restype = c_size_t
        L.fp4gemm_run.argtypes = [POINTER(Layer), POINTER(Problem), POINTER(Plan), c_void_p, c_size_t,
                                  c_void_p, c_void_p]
        L.fp4gemm_run.restype = c_int
        L.fp4gemm_flags_address.argtypes = [POINTER(Layer), POINTER(Plan), c_void_p]
        L.fp4gemm_flags_address.restype = c_void_p
        for name in ("fp4gemm_status_string", "fp4gemm_path_name"):
            getattr(L, name).argtypes = [c_int]
            getattr(L, name).restype = c_char_p
        L.fp4gemm_last_error_message.argtypes = []
        L.fp4gemm_last_error_message.restype = c_char_p
        L.fp4gemm_smallm_max_m.restype = c_int64
        L.fp4gemm_has_wgmma.restype = c_int32

    def _check(self, status: int, what: str) -> None:
        if status != OK:
            msg = self.lib.fp4gemm_last_error_message().decode()
            kind = self.lib.fp4gemm_status_string(status).decode()
            raise Fp4GemmError(status, f"{what}: {kind}: {msg}")

    def check_layer(self, layer: Layer) -> None:
        self._check(self.lib.fp4gemm_check_layer(ctypes.byref(layer)), "fp4gemm_check_layer")

    def adapter_bytes(self, layer: Layer) -> int:
        return int(self.lib.fp4gemm_adapter_bytes(ctypes.byref(layer)))

    def make_plan(self, layer: Layer, max_m: int, dtype: int, path: int | str = PATH_AUTO,
                  sm_version: int = 0, num_sms: int = 0) -> Plan:
        plan = Plan()
        path = PATHS[path] if isinstance(path, str) else path
        self._check(self.lib.fp4gemm_make_plan(ctypes.byref(layer), max_m, dtype, path, sm_version,
                                               num_sms, ctypes.byref(plan)), "fp4gemm_make_plan")
        return plan

    def workspace_size(self, layer: Layer, plan: Plan) -> int:
        return int(self.lib.fp4gemm_workspace_size(ctypes.byref(layer), ctypes.byref(plan)))

    def semaphore_count(self, layer: Layer, plan: Plan) -> int:
        return int(self.lib.fp4gemm_semaphore_count(ctypes.byref(layer), ctypes.byref(plan)))

    def flags_address(self, layer: Layer, plan: Plan, workspace: int) -> int | None:
        return self.lib.fp4gemm_flags_address(ctypes.byref(layer), ctypes.byref(plan), workspace)

    def run(self, layer: Layer, problem: Problem, plan: Plan, workspace: int, workspace_bytes: int,
            semaphores: int | None, stream: int | None) -> None:
        self._check(self.lib.fp4gemm_run(ctypes.byref(layer), ctypes.byref(problem), ctypes.byref(plan),
                                         workspace, workspace_bytes, semaphores, stream),
                    "fp4gemm_run")

    def path_name(self, path: int) -> str:
        return self.lib.fp4gemm_path_name(path).decode()

    @property
    def smallm_max_m(self) -> int:
        return int(self.lib.fp4gemm_smallm_max_m())

    @property
    def has_wgmma(self) -> bool:
        return bool(self.lib.fp4gemm_has_wgmma())
