"""The export_engine op domain: function bodies equal exporter.formats / the FP4Gemm contract."""
from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from exporter import onnx_ops as oo
from exporter.formats import SIGNED_FP4, UNSIGNED_FP4, get_format, with_bits
from exporter.packing import pack
from exporter.quantizers import ActQuantizer, fake_quantize

FORMATS = SIGNED_FP4 + UNSIGNED_FP4 + ("e4m3", "e2m3", "e3m2", "e2m2", "ue2m1")


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _hard_values(fmt, rng, shape=(64, 257)) -> np.ndarray:
    """Random values of every magnitude plus the edge cases: +-0, NaN, +-inf, subnormals,
    overflow, and every rounding midpoint of the grid (ties) with both signs."""
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 0.1, 1, 10, 1e3], (shape[0], 1)))
    x = x.astype(np.float32)
    edge = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-40, fmt.max * 2, -fmt.max * 2, fmt.max,
            -fmt.max, np.float32(fmt.max) * np.float32(1.0000001)]
    x[0, : len(edge)] = edge
    grid = fmt.grid().astype(np.float64)
    mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)[: shape[1]]
    x[1, : mids.size] = mids
    x[2, : mids.size] = -mids
    x[3, : mids.size] = np.nextafter(mids, np.float32(np.inf))
    x[4, : mids.size] = np.nextafter(mids, np.float32(-np.inf))
    return x


@pytest.mark.parametrize("name", FORMATS)
def test_quantize_fp_codes_equal_formats_encode_bit_for_bit(name):
    fmt = get_format(name)
    x = _hard_values(fmt, np.random.default_rng(0))
    model = oo.qdq_model(fmt, ["a", "b"])
    onnx.checker.check_model(model, full_check=True)
    y, codes = _ort(model, {"x": x})
    assert codes.dtype == np.int8  # the code bytes (TensorRT has no UINT8 intermediates)
    np.testing.assert_array_equal(codes.view(np.uint8), fmt.encode(x, nan="zero"))
    zp = None if fmt.signed else torch.tensor(0.0)
    expect = fake_quantize(torch.from_numpy(x), fmt, torch.tensor(1.0), zp).numpy()
    np.testing.assert_array_equal(y, expect)  # NaN positions equal too (e4m3 keeps NaN)


@pytest.mark.parametrize("name", ["e2m1", "ue3m1", "ue1m3"])
def test_scale_and_zero_point_follow_fake_quantize(name):
    fmt = get_format(name)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 40, 33)) * 3).astype(np.float32)
    scale, zp = np.float32(0.37), np.float32(-0.61)
    model = oo.qdq_model(fmt, [None, None, None], scale=scale, zero_point=zp)
    y, codes = _ort(model, {"x": x})
    t = torch.from_numpy(x)
    expect = fake_quantize(t, fmt, torch.tensor(scale), None if fmt.signed else torch.tensor(zp))
    np.testing.assert_array_equal(y, expect.numpy())
    u = x / scale if fmt.signed else (x - zp) / scale
    np.testing.assert_array_equal(codes.view(np.uint8), fmt.encode(u.astype(np.float32), nan="zero"))


@pytest.mark.parametrize("name", ["e2m1", "ue2m2"])
def test_dynamic_per_token_mode_matches_act_quantizer(name):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 37, 48)) * rng.uniform(0.01, 10, (2, 37, 1))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token takes the 1e-8 floor
    quant = ActQuantizer(name, "dynamic")
    model = oo.qdq_model(name, [None, None, None], axis=-1, dynamic=True)
    (y, _) = _ort(model, {"x": x})
    np.testing.assert_array_equal(y, quant(torch.from_numpy(x)).detach().numpy())


def test_fp16_input_and_output():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 64)) * 4).astype(np.float16)
    model = oo.qdq_model("e2m1", [8, 64], scale=0.5, x_dtype=np.float16)
    y, _ = _ort(model, {"x": x})
    assert y.dtype == np.float16
    expect = fake_quantize(torch.from_numpy(x), get_format("e2m1"), torch.tensor(0.5))
    np.testing.assert_array_equal(y, expect.numpy())


@pytest.mark.parametrize("name", ["e2m1", "ue3m1", "e3m0"])
def test_mixed_precision_channel_bits_match_weight_quantizer(name):
    from exporter.quantizers import WeightQuantizer

    rng = np.random.default_rng(4)
    base = get_format(name)
    w = rng.standard_normal((12, 5, 3, 3)).astype(np.float32)
    wq = WeightQuantizer(12, name)
    with torch.no_grad():
        wq.scale.copy_(torch.from_numpy(rng.uniform(0.05, 0.5, 12).astype(np.float32)))
        wq.bits.copy_(torch.tensor([base.bits + d for d in [-1, 0, 1] * 4], dtype=torch.int8))
    scale = wq.scale.detach().numpy().reshape(12, 1, 1, 1)
    model = oo.qdq_model(base, [12, 5, 3, 3], channel_bits=wq.bits.tolist(), scale=scale, axis=0)
    onnx.checker.check_model(model, full_check=True)
    y, codes = _ort(model, {"x": w})
    np.testing.assert_array_equal(y, wq(torch.from_numpy(w)).detach().numpy())
    for c, bits in enumerate(wq.bits.tolist()):
        fmt = with_bits(base, bits)
        np.testing.assert_array_equal(codes[c].view(np.uint8), fmt.encode(w[c] / scale[c], nan="zero"))


def test_onnx_runtime_equals_reference_evaluator():
    rng = np.random.default_rng(5)
    for name, dynamic in [("e2m1", False), ("ue3m1", False), ("ue2m2", True)]:
        fmt = get_format(name)
        x = _hard_values(fmt, rng, (8, 40))[:, :]
        x[np.isnan(x)] = 0  # NaN == NaN is false in assert_array_equal of reference outputs
        model = oo.qdq_model(fmt, [None, None], scale=0.7, zero_point=-0.2, dynamic=dynamic)
        got = _ort(model, {"x": x})
        ref = ReferenceEvaluator(model).run(None, {"x": x})
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


def test_integer_formats_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="minifloats"):
        oo.make_quantize_node(["x", "s", "z"], ["c"], "int4")


# ---------------------------------------------------------------------------------------------
# FP4Gemm against a float64 numpy reference written from docs/fp4gemm_contract.md
# ---------------------------------------------------------------------------------------------
def _random_fp4gemm_layer(rng, K, w_fmt, group_bits, group_sizes, adapters, a_fmt, a_mode):
    base = get_format(w_fmt)
    N = sum(group_sizes)
    fmts = [with_bits(base, b) for b in group_bits]
    codes = np.concatenate([rng.integers(0, f.num_codes, (adapters, n, K))
                            for f, n in zip(fmts, group_sizes)], axis=1)
    # E4M3 NaN codes would make the whole output NaN; keep weights finite
    packed = []
    for a in range(adapters):
        rows, r0 = [], 0
        for bits, n in zip(group_bits, group_sizes):
            rows.append(pack(codes[a, r0:r0 + n], bits, axis=-1).reshape(-1))
            r0 += n
        packed.append(np.concatenate(rows))
    lut = np.zeros((len(fmts), 256), np.float32)
    for g, f in enumerate(fmts):
        lut[g, : f.num_codes] = f.table
    weights = {
        "W": np.stack(packed).view(np.int8),
        "w_scale": rng.uniform(0.01, 0.2, N).astype(np.float32),
        "w_lut": lut,
        "a_scale": np.float32(rng.uniform(0.05, 0.5)),
        "a_zero": np.float32(0.0 if a_fmt is None or get_format(a_fmt).signed else rng.uniform(-0.3, 0)),
        "bias": rng.standard_normal(N).astype(np.float32),
        "perm": rng.permutation(N).astype(np.int32),
    }
    attrs = oo.fp4gemm_attrs(K, N, group_bits, group_sizes, a_fmt, a_mode)
    return weights, attrs, codes, fmts


def _fp4gemm_reference(x, adapter, weights, attrs, codes, fmts):
    """docs/fp4gemm_contract.md 'Semantics', activations in float32 as stated, GEMM in float64."""
    xf = x.astype(np.float32)
    if attrs["a_ebits"] > 0:
        prefix = "" if attrs["a_signed"] else "u"
        fmt = get_format(f"{prefix}e{attrs['a_ebits']}m{attrs['a_mbits']}")
        if attrs["a_mode"] == 0:
            s, z = weights["a_scale"], (weights["a_zero"] if not fmt.signed else np.float32(0))
        elif fmt.signed:
            s = np.maximum(np.abs(xf).max(-1, keepdims=True) / np.float32(fmt.max), np.float32(1e-8))
            z = np.float32(0)
        else:
            z = xf.min(-1, keepdims=True)
            s = np.maximum((xf.max(-1, keepdims=True) - z) / np.float32(fmt.max), np.float32(1e-8))
        u = ((xf - z) / s).astype(np.float32)
        xq = (z + s * fmt.decode(fmt.encode(u, nan="zero"))).astype(np.float32)
    else:
        xq = xf
    rows_fmt = np.concatenate([[g] * n for g, n in enumerate(attrs["group_sizes"])])
    wq = np.stack([fmts[rows_fmt[j]].table[codes[adapter, j]] for j in range(codes.shape[1])])
    wq = wq.astype(np.float64) * weights["w_scale"][:, None]
    yg = xq.astype(np.float64) @ wq.T + weights["bias"]
    y = np.empty_like(yg)
    y[..., weights["perm"]] = yg
    return y


FP4GEMM_CASES = [
    # weight format, group bits, group sizes, adapters, activation format, mode
    ("e2m1", [4], [24], 1, "e2m1", "static"),
    ("e1m2", [4], [24], 1, "e2m1", "static"),
    ("e3m0", [4], [24], 1, "e3m0", "static"),
    ("ue1m3", [4], [16], 1, "ue3m1", "static"),
    ("ue2m2", [4], [16], 1, "ue2m2", "static"),
    ("ue3m1", [4], [16], 1, "ue4m0", "static"),
    ("ue4m0", [4], [16], 1, "ue1m3", "static"),
    ("e2m1", [3, 4, 5], [5, 14, 5], 1, "e2m1", "static"),
    ("ue3m1", [3, 4, 5], [4, 8, 4], 3, "ue3m1", "static"),
    ("e2m1", [4], [24], 1, "e2m1", "dynamic"),
    ("e2m1", [4, 5], [12, 12], 2, "ue2m2", "dynamic"),
    ("e2m1", [4], [24], 4, "e2m1", "static"),
    ("e2m1", [4], [24], 1, None, "static"),
]


@pytest.mark.parametrize("case", FP4GEMM_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fp4gemm_node_in_onnx_runtime_matches_contract_reference(case):
    w_fmt, group_bits, group_sizes, adapters, a_fmt, a_mode = case
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    K = 37  # ragged: rows of 3/5-bit codes end mid-byte
    weights, attrs, codes, fmts = _random_fp4gemm_layer(rng, K, w_fmt, group_bits, group_sizes,
                                                         adapters, a_fmt, a_mode)
    model = oo.fp4gemm_model(weights, attrs)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (rng.standard_normal((2, 5, K)) * 2 + (0.5 if a_fmt and a_fmt.startswith("u") else 0))
    x = x.astype(np.float32)
    for adapter in range(adapters):
        (y,) = sess.run(None, {"X": x, "adapter": np.array(adapter, np.int64)})
        ref = _fp4gemm_reference(x, adapter, weights, attrs, codes, fmts)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_fp4gemm_fp16_activations_keep_their_dtype():
    rng = np.random.default_rng(9)
    weights, attrs, codes, fmts = _random_fp4gemm_layer(rng, 32, "e2m1", [4], [16], 1, "e2m1",
                                                         "static")
    model = oo.fp4gemm_model(weights, attrs, x_dtype=np.float16, x_rank=2)
    x = rng.standard_normal((3, 32)).astype(np.float16)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"X": x, "adapter": np.array(0, np.int64)})
    assert y.dtype == np.float16
    ref = _fp4gemm_reference(x, 0, weights, attrs, codes, fmts)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_fp4gemm_attrs_reject_inconsistent_layout():
    with pytest.raises(ValueError, match="sum to out_features"):
        oo.fp4gemm_attrs(16, 10, [4, 5], [4, 4], "e2m1")
