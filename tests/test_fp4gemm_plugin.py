"""The FP4Gemm TensorRT plugin (plugins/fp4_gemm/fp4gemm_plugin.cpp) and its loader.

Without TensorRT's C++ headers (CI) the compile and self-test checks skip with a reason; the
headers come from TensorRT's packages or the public NVIDIA/TensorRT repository's include/
(TensorRT_INCLUDE_DIR, TENSORRT_ROOT, or third_party/TensorRT*/include, which is git-ignored).
With TensorRT-RTX installed (the project's test extra), the plugin library is loaded into its
registry on the CPU. TensorRT-RTX's networks take no plugin layers (its INetworkDefinition has no
addPluginV3 and its ONNX parser aborts on one, seen with 1.7.1), so building and running an engine
with the plugin needs full TensorRT and a GPU: that test skips otherwise.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from exporter import onnx_ops as oo
from plugins import loader
from plugins.fp4_gemm import build
from plugins.fp4_gemm import reference as R

REPO = Path(__file__).resolve().parent.parent
NVCC = build.find_nvcc()
TRT_INCLUDE = build.find_tensorrt_include()
HEADER_DIRS = sorted({p for p in [TRT_INCLUDE, *(d / "include" for d in (REPO / "third_party").glob("TensorRT*"))]
                      if p is not None and (p / "NvInferRuntime.h").exists()})
needs_headers = pytest.mark.skipif(
    TRT_INCLUDE is None or NVCC is None,
    reason="TensorRT C++ headers not found (set TensorRT_INCLUDE_DIR or TENSORRT_ROOT) or no nvcc")
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
#: node attributes that become plugin fields (the others are the parser's plugin metadata)
FIELD_ATTRS = sorted(set(oo.FP4GEMM_ATTRS) - {"plugin_namespace", "plugin_version"})


@needs_headers
@pytest.mark.parametrize("include", HEADER_DIRS or [None], ids=lambda p: p.parent.name if p else "none")
def test_plugin_compiles_against_tensorrt_headers(include, tmp_path):
    if include is None:
        pytest.skip("no TensorRT headers")
    build.compile_plugin_object(include, tmp_path)  # -Wall -Wextra -Werror
    assert (tmp_path / "fp4gemm_plugin.o").stat().st_size > 0


@needs_headers
def test_plugin_self_test_passes():
    exe = build.build_plugin_selftest(TRT_INCLUDE)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "OK"
    fields = next(line for line in lines if line.startswith("fields:")).split()[1:]
    assert sorted(fields) == FIELD_ATTRS  # every ONNX attribute reaches the plugin


RTX_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tensorrt_rtx as trt
    from plugins import loader
    from exporter import onnx_ops as oo
    lib = loader.load_plugin(trt, library=sys.argv[1])
    loader.load_plugin(trt, library=sys.argv[1])  # twice is fine
    reg = trt.get_plugin_registry()
    creator = loader.get_creator(trt)
    out = {"found": creator is not None,
           "listed": [[c.name, c.plugin_version, c.plugin_namespace] for c in reg.all_creators
                      if c.name == "FP4Gemm"],
           "fields": sorted(f.name for f in creator.field_names)}

    def fields(attrs):
        keep = []
        for k, v in attrs.items():
            if isinstance(v, str):
                continue
            a = np.array(v if isinstance(v, list) else [v], np.int32)
            keep.append(trt.PluginField(k, a, trt.PluginFieldType.INT32))
        return trt.PluginFieldCollection(keep), keep

    good = oo.fp4gemm_attrs(1280, 640, [3, 4, 5], [64, 512, 64], "ue2m2", "dynamic")
    fc, keep = fields(good)
    plugin = creator.create_plugin("good", fc, trt.TensorRTPhase.BUILD)
    core = plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
    out["core"] = [core.plugin_name, core.plugin_version, core.plugin_namespace]
    out["outputs"] = plugin.get_capability_interface(trt.PluginCapabilityType.BUILD).num_outputs
    bad = dict(good, group_sizes=[64, 500, 64])
    fc, keep = fields(bad)
    out["bad"] = creator.create_plugin("bad", fc, trt.TensorRTPhase.BUILD) is None
    print(json.dumps(out))
''')


@needs_headers
@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed")
def test_plugin_registers_in_tensorrt_rtx_under_its_namespace():
    # kernels=False: the stub launchers keep this build to seconds; registration and creation
    # are host code. A subprocess keeps the process-wide registry (and any crash) contained.
    lib = build.build_plugin_library(TRT_INCLUDE, kernels=False)
    proc = subprocess.run([sys.executable, "-c", RTX_SCRIPT, str(lib)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["found"]
    assert ["FP4Gemm", "1", "export_engine"] in out["listed"]
    assert out["fields"] == FIELD_ATTRS
    assert out["core"] == ["FP4Gemm", "1", "export_engine"]
    assert out["outputs"] == 1
    assert out["bad"], "inconsistent attributes must not create a plugin"
    assert "FP4Gemm plugin" in proc.stderr and "sum to" in proc.stderr  # the error says why


def test_loader_reports_a_missing_library_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("FP4GEMM_PLUGIN_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(loader.PluginLoadError, match="does not exist"):
        loader.plugin_library_path()
    monkeypatch.delenv("FP4GEMM_PLUGIN_LIB")
    monkeypatch.setattr(loader, "CMAKE_BUILD_DIR", tmp_path)
    monkeypatch.setattr(loader, "REPO", tmp_path)
    with pytest.raises(loader.PluginLoadError, match="not found"):
        loader.plugin_library_path(build_if_missing=False)


def test_loader_names_the_static_plugin_flag_for_trtexec(monkeypatch, tmp_path):
    lib = tmp_path / "libfp4gemm_plugin.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("FP4GEMM_PLUGIN_LIB", str(lib))
    assert loader.trtexec_flags() == [f"--staticPlugins={lib}"]


# ---------------------------------------------------------------------------------------------
# GPU + full TensorRT: an engine with the plugin against the numpy model
# ---------------------------------------------------------------------------------------------
def _full_tensorrt():
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return None
    return tensorrt if torch.cuda.is_available() else None


@pytest.mark.gpu
@pytest.mark.skipif(_full_tensorrt() is None, reason="needs a CUDA GPU and the full `tensorrt` package")
@pytest.mark.parametrize("a_fmt, mode, dtype", [("e2m1", "static", np.float16), ("ue2m2", "dynamic", np.float16),
                                                (None, "static", np.float16), ("e2m1", "static", np.float32)])
def test_engine_with_the_plugin_matches_the_numpy_model(a_fmt, mode, dtype, tmp_path):
    import tensorrt as trt
    import torch

    loader.load_plugin(trt)
    rng = np.random.default_rng(0)
    K = 640
    weights, attrs = R.random_layer(rng, K, "e2m1", [3, 4, 5], [32, 192, 32], a_fmt, mode, adapters=2)
    model = oo.fp4gemm_model(weights, attrs, x_dtype=dtype, x_rank=3)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [parser.get_error(i).desc() for i in range(parser.num_errors)]
    layer_types = [network.get_layer(i).type for i in range(network.num_layers)]
    assert trt.LayerType.PLUGIN_V3 in layer_types, "the FP4Gemm node must become the plugin, not its body"
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("X", (1, 1, K), (2, 64, K), (4, 512, K))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    tdt = torch.float16 if dtype == np.float16 else torch.float32
    for shape, adapter in [((1, 3, K), 0), ((4, 512, K), 1), ((2, 7, K), 1)]:
        x_np = R.random_activations(rng, shape, attrs, dtype=dtype)
        x = torch.from_numpy(x_np).cuda()
        ad = torch.tensor(adapter, dtype=torch.int64, device="cuda")
        y = torch.full(shape[:-1] + (attrs["out_features"],), float("nan"), dtype=tdt, device="cuda")
        context.set_input_shape("X", shape)
        for name, t in (("X", x), ("adapter", ad), ("Y", y)):
            context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        assert context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        ref = R.kernel_model(x_np, weights, adapter, attrs, out_dtype=np.float32)
        got = y.float().cpu().numpy()
        assert not np.isnan(got).any()
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err <= 1e-3, (shape, adapter, err)
