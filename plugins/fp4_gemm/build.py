"""Build the FP4Gemm libraries with nvcc and a C++ compiler alone (no CMake needed).

CMake (plugins/CMakeLists.txt) is the supported build; these helpers exist for the tests and for
``plugins.loader`` on machines without CMake. Outputs are cached by a hash of the sources and
flags under :func:`cache_dir`, with a file lock, so parallel test workers share one build.

    build_kernel_library(archs=("80",))      -> .../libfp4gemm_kernels.so (ctypes: fp4gemm.h)
    build_plugin_library(trt_include)        -> .../libfp4gemm_plugin.so (TensorRT plugin)
    build_host_check()                       -> .../libfp4gemm_host_check.so (CPU numerics)
    build_dispatcher_library(with_wgmma)     -> the C API without device code (CPU tests)
    build_plugin_selftest(trt_include)       -> the plugin's CPU self-test executable
    compile_objects(arch)                    -> object files: the per-architecture compile check
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

HERE = Path(__file__).resolve().parent
CUDA_SOURCES = ("fp4gemm_prep.cu", "fp4gemm_simt.cu", "fp4gemm_smallm.cu", "fp4gemm_mma.cu",
                "fp4gemm_wgmma.cu")
API_SOURCE = "fp4gemm_api.cpp"
PLUGIN_SOURCE = "fp4gemm_plugin.cpp"
HOST_CHECK_SOURCE = "fp4gemm_host_check.cpp"
STUBS_SOURCE = "fp4gemm_launch_stubs.cpp"
SELFTEST_SOURCE = "fp4gemm_plugin_selftest.cpp"
HEADERS = ("fp4gemm.h", "fp4gemm_common.cuh", "fp4gemm_numerics.cuh", "fp4gemm_plugin.h")
#: architectures of a full build; "90a" is sm_90 with the wgmma instructions
ARCHS = ("80", "86", "89", "90a")
NVCC_FLAGS = ("-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Xcompiler=-fPIC",
              "-Xcompiler=-fvisibility=hidden", "-Xptxas=-warn-spills")
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall")


class BuildError(RuntimeError):
    """A compiler or linker failed; the message holds its command and output."""


def find_nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME or /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


def find_cxx() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def cache_dir() -> Path:
    root = os.environ.get("FP4GEMM_BUILD_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                  "export_engine_fp4gemm")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def gencode(arch: str) -> str:
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def _hash(files: Iterable[Path], *extra: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


def _headers() -> list[Path]:
    return [HERE / h for h in HEADERS if (HERE / h).exists()]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return out


def _need(tool: str | None, name: str) -> str:
    if not tool:
        raise BuildError(f"{name} not found: install the CUDA toolkit (nvcc) and a C++ compiler, "
                         "or set CUDA_HOME / CXX")
    return tool


def compile_cuda(src: Path, archs: Sequence[str], out: Path, nvcc: str | None = None,
                 defines: Sequence[str] = ()) -> str:
    """One .cu file to an object for the given architectures; returns the compiler's output."""
    nvcc = _need(nvcc or find_nvcc(), "nvcc")
    cmd = [nvcc, *NVCC_FLAGS, *[gencode(a) for a in archs], *[f"-D{d}" for d in defines],
           "-I", str(HERE), "-c", str(src), "-o", str(out)]
    return _run(cmd)


def compile_cxx(src: Path, out: Path, includes: Sequence[Path] = (), defines: Sequence[str] = (),
                extra: Sequence[str] = ()) -> str:
    """A host C++ file, through nvcc (which knows the CUDA include paths) and the host compiler.

    ``includes`` are searched as system headers (TensorRT's own headers warn about deprecations).
    """
    nvcc = _need(find_nvcc(), "nvcc")
    host = ",".join(CXX_FLAGS[1:] + tuple(extra))  # -std goes to nvcc itself
    cmd = [nvcc, "-std=c++17", f"-Xcompiler={host}", *[f"-D{d}" for d in defines], f"-I{HERE}",
           *[a for p in includes for a in ("-isystem", str(p))], "-c", str(src), "-o", str(out)]
    return _run(cmd)


def _objects(sources: Sequence[Path], out_dir: Path, includes: Sequence[Path] = (),
             defines: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """Each host source compiled (compile_cxx) to ``out_dir/<name>.o``; the object paths."""
    objs = []
    for src in sources:
        obj = out_dir / f"{src.name}.o"
        compile_cxx(src, obj, includes, defines, extra)
        objs.append(str(obj))
    return objs


def compile_objects(arch: str, out_dir: Path, jobs: int = 2) -> dict[str, str]:
    """Compile every kernel source for one architecture (the CI compile check).

    Returns {source: compiler output}; raises BuildError on the first failure.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {src: pool.submit(compile_cuda, HERE / src, [arch], out_dir / f"{src}.{arch}.o")
                   for src in CUDA_SOURCES}
        return {src: f.result() for src, f in futures.items()}


def _build_shared(name: str, archs: Sequence[str], extra_cxx: Sequence[tuple[Path, Sequence[Path]]],
                  out_dir: Path | None, jobs: int, link_flags: Sequence[str] = (),
                  cuda_sources: Sequence[str] = CUDA_SOURCES) -> Path:
    nvcc = _need(find_nvcc(), "nvcc")
    defines = ["FP4GEMM_HAS_SM90A=1"] if "90a" in archs else []
    sources = [HERE / s for s in cuda_sources] + [HERE / API_SOURCE] + [s for s, _ in extra_cxx]
    key = _hash(sources + _headers(), name, *archs, *NVCC_FLAGS, *CXX_FLAGS)
    out_dir = Path(out_dir) if out_dir else cache_dir() / f"{name}-{key}"
    lib = out_dir / f"lib{name}.so"
    with _locked(out_dir / "build"):
        if lib.exists():
            return lib
        obj_dir = out_dir / "obj"
        obj_dir.mkdir(parents=True, exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futs = [pool.submit(compile_cuda, HERE / s, archs, obj_dir / f"{s}.o", nvcc, defines)
                    for s in cuda_sources]
            futs.append(pool.submit(compile_cxx, HERE / API_SOURCE, obj_dir / f"{API_SOURCE}.o",
                                    (), defines))
            for src, inc in extra_cxx:
                futs.append(pool.submit(compile_cxx, src, obj_dir / f"{src.name}.o", inc, defines))
            for f in futs:
                f.result()
        objs = sorted(str(p) for p in obj_dir.glob("*.o"))
        tmp = lib.with_suffix(".so.tmp")
        _run([nvcc, "-shared", "-cudart", "shared", "-o", str(tmp), *objs, *link_flags])
        tmp.replace(lib)
    return lib


def build_kernel_library(archs: Sequence[str] = ARCHS, out_dir: Path | None = None,
                         jobs: int = 2) -> Path:
    """libfp4gemm_kernels.so (the C API of fp4gemm.h) for ``archs``."""
    return _build_shared("fp4gemm_kernels", archs, [], out_dir, jobs)


def build_plugin_library(trt_include: Path, archs: Sequence[str] = ARCHS,
                         out_dir: Path | None = None, jobs: int = 2, kernels: bool = True) -> Path:
    """libfp4gemm_plugin.so: the TensorRT plugin with the kernels linked in.

    TensorRT's runtime is not linked: ``getPluginRegistry`` resolves against the TensorRT library
    already loaded in the process (plugins.loader loads it with RTLD_GLOBAL first).
    ``kernels=False`` links the stub launchers instead of device code: a plugin that registers,
    creates and plans but cannot run (fast to build; the CPU registry tests use it).
    """
    trt_include = Path(trt_include)
    if not (trt_include / "NvInfer.h").exists():
        raise BuildError(f"{trt_include} holds no NvInfer.h")
    extra = [(HERE / PLUGIN_SOURCE, [trt_include])]
    if not kernels:
        extra.append((HERE / STUBS_SOURCE, []))
    name = "fp4gemm_plugin" if kernels else "fp4gemm_plugin_nokernels"
    return _build_shared(name, archs if kernels else (), extra, out_dir, jobs,
                         cuda_sources=CUDA_SOURCES if kernels else ())


def compile_plugin_object(trt_include: Path, out_dir: Path) -> str:
    """Compile only the plugin wrapper against TensorRT's headers (the plugin compile check)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return compile_cxx(HERE / PLUGIN_SOURCE, out_dir / "fp4gemm_plugin.o", [Path(trt_include)],
                       extra=("-Wextra", "-Werror"))


def find_tensorrt_include() -> Path | None:
    """TensorRT's headers: $TensorRT_INCLUDE_DIR, $TENSORRT_ROOT/include, or the repository's
    third_party/TensorRT/include (fetched from the public NVIDIA/TensorRT repository; git-ignored)."""
    candidates = [os.environ.get("TensorRT_INCLUDE_DIR")]
    if os.environ.get("TENSORRT_ROOT"):
        candidates.append(os.path.join(os.environ["TENSORRT_ROOT"], "include"))
    candidates.append(str(HERE.parent.parent / "third_party" / "TensorRT" / "include"))
    for c in candidates:
        if c and (Path(c) / "NvInfer.h").exists() and (Path(c) / "NvInferRuntimePlugin.h").exists():
            return Path(c)
    return None


def build_host_check(out_dir: Path | None = None) -> Path:
    """libfp4gemm_host_check.so: the kernels' scalar numerics compiled for the CPU."""
    cxx = _need(find_cxx(), "a C++ compiler")
    src = HERE / HOST_CHECK_SOURCE
    key = _hash([src, HERE / "fp4gemm_numerics.cuh"], cxx)
    out_dir = Path(out_dir) if out_dir else cache_dir() / f"host_check-{key}"
    lib = out_dir / "libfp4gemm_host_check.so"
    with _locked(out_dir / "build"):
        if not lib.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_suffix(".so.tmp")
            _run([cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", f"-I{HERE}",
                  str(src), "-o", str(tmp)])
            tmp.replace(lib)
    return lib


def build_dispatcher_library(with_wgmma: bool = True, out_dir: Path | None = None) -> Path:
    """The C API (fp4gemm_api.cpp) with stub launchers: plans and checks without device code.

    ``with_wgmma`` says what fp4gemm_has_wgmma() reports (a build that includes sm_90a).
    """
    nvcc = _need(find_nvcc(), "nvcc")
    sources = [HERE / API_SOURCE, HERE / STUBS_SOURCE]
    defines = ["FP4GEMM_HAS_SM90A=1"] if with_wgmma else []
    key = _hash(sources + _headers(), *defines, *CXX_FLAGS)
    out_dir = Path(out_dir) if out_dir else cache_dir() / f"dispatcher-{key}"
    lib = out_dir / "libfp4gemm_dispatcher.so"
    with _locked(out_dir / "build"):
        if not lib.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            objs = _objects(sources, out_dir, (), defines)
            tmp = lib.with_suffix(".so.tmp")
            _run([nvcc, "-shared", "-cudart", "shared", "-o", str(tmp), *objs])
            tmp.replace(lib)
    return lib


def build_plugin_selftest(trt_include: Path, out_dir: Path | None = None) -> Path:
    """The plugin's CPU self-test (fp4gemm_plugin_selftest.cpp): TensorRT headers, no TensorRT
    library and no device code (the dispatcher build of the kernels)."""
    nvcc = _need(find_nvcc(), "nvcc")
    trt_include = Path(trt_include)
    sources = [HERE / SELFTEST_SOURCE, HERE / PLUGIN_SOURCE, HERE / API_SOURCE, HERE / STUBS_SOURCE]
    key = _hash(sources + _headers(), str(trt_include), *CXX_FLAGS)
    out_dir = Path(out_dir) if out_dir else cache_dir() / f"selftest-{key}"
    exe = out_dir / "fp4gemm_plugin_selftest"
    with _locked(out_dir / "build"):
        if not exe.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            objs = _objects(sources, out_dir, [trt_include], extra=("-Wextra", "-Werror"))
            tmp = out_dir / "fp4gemm_plugin_selftest.tmp"
            _run([nvcc, "-cudart", "shared", "-o", str(tmp), *objs])
            tmp.replace(exe)
    return exe
