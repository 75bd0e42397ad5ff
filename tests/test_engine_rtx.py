"""TensorRT-RTX parses and builds our exported graphs for SM89 on a CPU-only machine."""
from __future__ import annotations

import warnings

import pytest
import torch

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by the test setup")

from exporter import onnx_ops  # noqa: E402
from exporter.engine import EngineBuildError, build_engine, compute_capability, unet_profile  # noqa: E402

torch.set_num_threads(1)


def test_quantize_dequantize_pair_builds_for_sm89(tmp_path):
    import onnx

    model = onnx_ops.qdq_model("ue3m1", [8, 64], channel_bits=None, scale=0.5, zero_point=-0.2)
    onnx.save(model, tmp_path / "qdq.onnx")
    res = build_engine(tmp_path / "qdq.onnx", tmp_path / "qdq.plan", sm=89, quiet=True)
    assert res.sm == "SM89" and res.engine_bytes > 0
    assert (tmp_path / "qdq.plan").stat().st_size == res.engine_bytes


def test_compute_capability_names_and_errors():
    assert compute_capability(trt, 89).name == "SM89"
    assert compute_capability(trt, "sm_120").name == "SM120"
    assert compute_capability(trt, "8.6").name == "SM86"
    with pytest.raises(ValueError, match="SM89"):
        compute_capability(trt, 90)  # TensorRT-RTX does not build for Hopper


def test_dynamic_inputs_need_a_profile(tmp_path):
    import onnx

    onnx.save(onnx_ops.qdq_model("e2m1", ["n", 16]), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"inputs \['x'\] have dynamic shapes"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", sm=89, quiet=True)
    assert not (tmp_path / "m.plan").exists()


def test_unparsable_model_is_a_clear_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(EngineBuildError, match="could not parse"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.plan", sm=89, quiet=True)
    assert not (tmp_path / "bad.plan").exists()


@pytest.mark.slow
def test_exported_sdxl_tiny_w4a4_talora_builds_for_sm89(tmp_path):
    from exporter.export import export_unet
    from quant_helpers import tiny_quantized

    model, _ = tiny_quantized(finetune_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_unet(model, tmp_path / "unet.onnx", batch=1, height=16, width=16, text_len=16)
    cfg = model.config
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    profile = unet_profile(batch=(1, 1, 2), latent=(16, 16, 16), text_len=(16, 16, 16),
                           in_channels=cfg.in_channels, context_dim=cfg.cross_attention_dim,
                           text_embeds_dim=text_dim)
    res = build_engine(tmp_path / "unet.onnx", tmp_path / "unet.plan", sm=89, profiles=profile,
                       quiet=True, optimization_level=0)
    assert res.module == "tensorrt_rtx" and res.sm == "SM89" and res.engine_bytes > 1_000_000
