"""Number formats: agreement with ml_dtypes, numpy == torch, round trips, error bounds, bad input."""
import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.formats import KNOWN_FORMATS, get_format, with_bits

MINIFLOATS = [n for n in KNOWN_FORMATS if "int" not in n]
ML_DTYPES = {"e2m1": ml_dtypes.float4_e2m1fn, "e4m3": ml_dtypes.float8_e4m3fn,
             "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn}


def tie_and_boundary_points(fmt) -> np.ndarray:
    """Every grid value, every midpoint between neighbours, and their float32 neighbours."""
    g = fmt.grid().astype(np.float64)
    mids = (g[1:] + g[:-1]) / 2
    pts = np.concatenate([g, mids, [fmt.max * 1.5, fmt.max * 1e3, -fmt.max * 1e3, fmt.min * 1.5]])
    pts = pts.astype(np.float32)
    return np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)),
                           np.nextafter(pts, np.float32(-np.inf)), [-0.0, 0.0]]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_encode_matches_ml_dtypes(name):
    fmt = get_format(name)
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(1_000_000).astype(np.float32) * fmt.max / 3,
        np.exp(rng.uniform(-20, 8, 100_000)).astype(np.float32) * rng.choice([-1, 1], 100_000),
        tie_and_boundary_points(fmt),
        np.array([np.inf, -np.inf], np.float32),
    ])
    # ml_dtypes casts do not saturate (E4M3FN overflows to NaN): saturate first, as our spec does
    ref = np.clip(x, -fmt.max, fmt.max).astype(ML_DTYPES[name]).view(np.uint8)
    ours = fmt.encode(x)
    bad = np.flatnonzero(ours != ref)
    assert bad.size == 0, f"{name}: first mismatches x={x[bad[:5]]} ours={ours[bad[:5]]} ref={ref[bad[:5]]}"
    # decode agrees too (NaN codes excluded: ml_dtypes and we both say NaN)
    codes = np.arange(fmt.num_codes, dtype=np.uint8)
    ref_vals = codes.view(ML_DTYPES[name]).astype(np.float32)
    np.testing.assert_array_equal(fmt.decode(codes), ref_vals)


def test_negative_zero_keeps_sign_bit():
    fmt = get_format("e2m1")
    codes = fmt.encode(np.array([-0.0, 0.0, -0.2, 0.2], np.float32))
    assert codes.tolist() == [0x8, 0x0, 0x8, 0x0]
    assert np.signbit(fmt.decode(codes)).tolist() == [True, False, True, False]


def _reference_nearest(fmt, x: np.ndarray) -> np.ndarray:
    """float64 brute force: the nearest grid value; a tie between magnitudes a < b goes to the
    one whose significand at step b - a is even (a / (b - a) even -> a), i.e. IEEE ties-to-even."""
    g = fmt.grid().astype(np.float64)
    xs = np.clip(x.astype(np.float64), fmt.min, fmt.max)
    d = np.abs(xs[:, None] - g[None, :])
    best = d.min(1, keepdims=True)
    cand = np.where(d == best, g[None, :], np.nan)
    lo, hi = np.nanmin(cand, 1), np.nanmax(cand, 1)
    small = np.where(np.abs(lo) < np.abs(hi), lo, hi)
    large = np.where(np.abs(lo) < np.abs(hi), hi, lo)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.abs(small) / np.abs(large - small)
        return np.where((lo == hi) | (np.mod(r, 2) == 0), small, large)


@pytest.mark.parametrize("name", KNOWN_FORMATS)
def test_quantize_is_nearest_grid_value_float64(name):
    fmt = get_format(name)
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(fmt.min * 1.2 - 1, fmt.max * 1.2, 20_000).astype(np.float32),
                        tie_and_boundary_points(fmt)])
    q = fmt.quantize(x).astype(np.float64)
    np.testing.assert_array_equal(q, _reference_nearest(fmt, x))


@pytest.mark.parametrize("name", KNOWN_FORMATS)
def test_decode_encode_roundtrips_every_code(name):
    fmt = get_format(name)
    codes = np.arange(fmt.num_codes, dtype=np.uint8)
    vals = fmt.decode(codes)
    finite = np.isfinite(vals)
    assert (fmt.encode(vals[finite]) == codes[finite]).all()
    np.testing.assert_array_equal(fmt.quantize(fmt.grid()), fmt.grid())


@pytest.mark.parametrize("name", KNOWN_FORMATS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_torch_and_numpy_give_identical_codes(name, data):
    fmt = get_format(name)
    x = np.array(data.draw(st.lists(
        st.floats(allow_nan=False, width=32, min_value=-4 * fmt.max - 1, max_value=4 * fmt.max + 1),
        min_size=1, max_size=64)), np.float32)
    x = np.concatenate([x, tie_and_boundary_points(fmt)])
    np_codes = fmt.encode(x)
    t_codes = fmt.encode_torch(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(np_codes, t_codes)
    np.testing.assert_array_equal(fmt.quantize_torch(torch.from_numpy(x)).numpy(), fmt.quantize(x))


@pytest.mark.parametrize("name", KNOWN_FORMATS)
@settings(max_examples=60, deadline=None)
@given(v=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_quantize_error_at_most_half_the_local_step(name, v):
    fmt = get_format(name)
    g = fmt.grid().astype(np.float64)
    x = float(np.clip(v, fmt.min, fmt.max))
    q = float(fmt.quantize(np.array([x], np.float32))[0])
    i = np.searchsorted(g, x)
    lo, hi = g[max(i - 1, 0)], g[min(i, len(g) - 1)]
    step = (hi - lo) if hi > lo else 0.0
    assert abs(q - x) <= step / 2 + 1e-12 * abs(x)


def test_saturation_and_infinity():
    for name in ("e2m1", "e3m0", "ue2m2", "e4m3", "int4", "uint4"):
        fmt = get_format(name)
        x = np.array([np.inf, -np.inf, 1e30, -1e30], np.float32)
        q = fmt.quantize(x)
        assert q.tolist() == [fmt.max, fmt.min, fmt.max, fmt.min], name


def test_unsigned_formats_clamp_negatives_to_zero():
    fmt = get_format("ue3m1")
    assert fmt.quantize(np.array([-5.0, -0.0, -1e-9], np.float32)).tolist() == [0.0, 0.0, 0.0]
    assert fmt.grid()[0] == 0 and fmt.max == 24.0


def test_e4m3_is_ocp_e4m3fn():
    fmt = get_format("e4m3")
    assert fmt.max == 448.0 and np.isnan(fmt.table[0x7F]) and np.isnan(fmt.table[0xFF])
    assert np.isfinite(fmt.table[:0x7F]).all()
    assert fmt.encode(np.array([np.nan], np.float32), nan="zero")[0] == 0x7F


def test_four_bit_formats_use_every_code():
    for name in ("e1m2", "e2m1", "e3m0", "ue1m3", "ue2m2", "ue3m1", "ue4m0"):
        fmt = get_format(name)
        assert fmt.bits == 4 and np.isfinite(fmt.table).all()
        # signed formats have +0 and -0; unsigned ones have 16 distinct values
        assert len(fmt.grid()) == (15 if fmt.signed else 16)


def test_every_four_bit_value_is_exact_in_e4m3():
    e4m3 = get_format("e4m3")
    for name in ("e1m2", "e2m1", "e3m0", "ue1m3", "ue2m2", "ue3m1", "ue4m0"):
        g = get_format(name).grid()
        assert (e4m3.quantize(g) == g).all(), name


def test_nan_raises_by_default_and_maps_to_zero_on_request():
    fmt = get_format("e2m1")
    with pytest.raises(ValueError, match="NaN"):
        fmt.encode(np.array([1.0, np.nan], np.float32))
    assert fmt.encode(np.array([np.nan], np.float32), nan="zero")[0] == 0
    assert fmt.encode_torch(torch.tensor([float("nan")]))[0] == 0


@pytest.mark.parametrize("bad, err", [("e9m9", ValueError), ("fp5", ValueError), ("e0m3", ValueError),
                                      ("int9", ValueError), ("e4m4", ValueError), (4, TypeError)])
def test_bad_format_names_give_clear_errors(bad, err):
    with pytest.raises(err):
        get_format(bad)


def test_wrong_dtypes_are_rejected():
    fmt = get_format("e2m1")
    with pytest.raises(TypeError, match="floating-point"):
        fmt.encode(np.array([1, 2], np.int32))
    with pytest.raises(TypeError, match="integer codes"):
        fmt.decode(np.array([1.0]))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        fmt.decode(np.array([16]))
    with pytest.raises(TypeError):
        fmt.encode_torch(torch.tensor([1, 2]))


def test_mixed_precision_neighbours():
    assert with_bits(get_format("e2m1"), 3).name == "e2m0"
    assert with_bits(get_format("e2m1"), 5).name == "e2m2"
    assert with_bits(get_format("e3m0"), 3).name == "e2m0"
    assert with_bits(get_format("ue2m2"), 5).name == "ue2m3"
    assert with_bits(get_format("int4"), 5).name == "int5"


def test_int_formats_are_twos_complement():
    fmt = get_format("int4")
    assert fmt.encode(np.array([-8.0, -1.0, 7.0, 2.5, 3.5], np.float32)).tolist() == [8, 15, 7, 2, 4]
