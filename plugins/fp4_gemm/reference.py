"""numpy model of what the FP4Gemm CUDA kernels compute (docs/fp4gemm_contract.md).

The kernels do not evaluate the contract's formula literally; they reorder it so that 4-bit
operands reach the tensor cores as exact FP8 E4M3 (or FP16) values:

    U[m, k]  = decode(encode((X[m, k] - z_m) / s_m))     activation grid values (unscaled)
    L[j, k]  = w_lut[group(j), code[j, k]]                weight grid values (unscaled)
    acc      = U @ L^T                                    tensor cores, fp32 accumulation
    r_j      = w_scale[j] * sum_k L[j, k]                 row sums, for the zero point
    Yg[m, j] = s_m * (acc[m, j] * w_scale[j]) + (z_m * r_j + bias[j])
    Y[m, perm[j]] = Yg[m, j],  cast to X's dtype

which equals ``(z + s * U) @ (w_scale * L)^T + bias`` up to fp32 rounding. W4A16 layers
(``a_ebits == 0``) use U = X, s = 1, z = 0. :func:`kernel_model` is that computation, with the
dot products exact (float64: every product and partial sum of these few-bit values is exact there)
and the epilogue in float32 in the kernels' order; it is the oracle of the GPU tests.
:func:`contract_reference` is the contract's formula as written. The CPU tests check that both
agree with the ``FP4Gemm`` ONNX function body (exporter/onnx_ops.py) run in ONNX Runtime.

Everything here is built on :mod:`exporter.formats` and :mod:`exporter.packing`, the single
definition of the formats and the packed layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from exporter.formats import Format, get_format, with_bits
from exporter.packing import pack, packed_length, unpack

#: smallest dynamic scale (exporter.quantizers.DYNAMIC_EPS), as float32
DYNAMIC_EPS = np.float32(1e-8)
#: FP4Gemm inputs after X, in contract order
WEIGHT_INPUTS = ("W", "w_scale", "w_lut", "a_scale", "a_zero", "bias", "perm")


@dataclass(frozen=True)
class Layout:
    """The static description of one FP4Gemm node (its attributes), with derived sizes."""

    K: int
    N: int
    group_bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    a_fmt: Format | None  # None: activations are not quantized (W4A16)
    dynamic: bool

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> "Layout":
        K, N = int(attrs["in_features"]), int(attrs["out_features"])
        bits = tuple(int(b) for b in attrs["group_bits"])
        sizes = tuple(int(s) for s in attrs["group_sizes"])
        if len(bits) != len(sizes) or sum(sizes) != N:
            raise ValueError(f"group_sizes {sizes} must sum to out_features={N} and match "
                             f"group_bits {bits}")
        return cls(K, N, bits, sizes, activation_format(attrs), bool(attrs.get("a_mode", 0)))

    @property
    def row_bytes(self) -> tuple[int, ...]:
        """Bytes of one packed row in each group."""
        return tuple(packed_length(self.K, b) for b in self.group_bits)

    @property
    def adapter_bytes(self) -> int:
        """B: bytes of one adapter's packed weights (W is [A, B])."""
        return sum(n * rb for n, rb in zip(self.group_sizes, self.row_bytes))

    def group_of_row(self) -> np.ndarray:
        """[N] group index of every grouped row."""
        return np.repeat(np.arange(len(self.group_sizes)), self.group_sizes)


def activation_format(attrs: Mapping) -> Format | None:
    """The activation minifloat named by the a_* attributes (None when a_ebits == 0)."""
    ebits = int(attrs["a_ebits"])
    if ebits == 0:
        return None
    signed, mbits = bool(attrs["a_signed"]), int(attrs["a_mbits"])
    fmt = get_format(f"{'' if signed else 'u'}e{ebits}m{mbits}")
    bias = int(attrs["a_bias"])
    if bias != fmt.bias:  # a non-default bias is legal in the contract: same format, moved grid
        fmt = Format(f"{fmt.name}_b{bias}", "float", signed, ebits, mbits, bias,
                     nan_code=fmt.nan_code)
    if int(attrs["a_max_code"]) != fmt.max_code_mag:
        raise ValueError(f"a_max_code={attrs['a_max_code']} does not match {fmt.name} "
                         f"(max code magnitude {fmt.max_code_mag})")
    return fmt


def unpack_codes(W: np.ndarray, adapter: int, layout: Layout) -> np.ndarray:
    """[N, K] uint8 codes of one adapter from the packed [A, B] INT8 weights (grouped order)."""
    W = np.asarray(W)
    if W.ndim != 2 or W.shape[1] != layout.adapter_bytes:
        raise ValueError(f"W must be [A, {layout.adapter_bytes}], got {W.shape}")
    if not 0 <= adapter < W.shape[0]:
        raise ValueError(f"adapter {adapter} out of range [0, {W.shape[0]})")
    flat = W[adapter].view(np.uint8)
    out, pos = [], 0
    for bits, n, rb in zip(layout.group_bits, layout.group_sizes, layout.row_bytes):
        rows = flat[pos:pos + n * rb].reshape(n, rb)
        out.append(unpack(rows, bits, layout.K, axis=-1))
        pos += n * rb
    return np.concatenate(out, axis=0) if out else np.zeros((0, layout.K), np.uint8)


def activation_params(xf: np.ndarray, fmt: Format, dynamic: bool, a_scale, a_zero):
    """(s, z) of the contract, float32, broadcastable against xf [..., K]."""
    if not dynamic:
        z = np.float32(0.0) if fmt.signed else np.float32(a_zero)
        return np.float32(a_scale), z
    fmax = np.float32(fmt.max)
    if fmt.signed:
        s = np.maximum(np.abs(xf).max(-1, keepdims=True) / fmax, DYNAMIC_EPS)
        return s.astype(np.float32), np.zeros_like(s, dtype=np.float32)
    z = xf.min(-1, keepdims=True)
    s = np.maximum((xf.max(-1, keepdims=True) - z) / fmax, DYNAMIC_EPS)
    return s.astype(np.float32), z.astype(np.float32)


def activation_grid_values(xf: np.ndarray, fmt: Format, s, z) -> np.ndarray:
    """U = decode(encode((x - z) / s)): the grid values the kernels feed to the tensor cores."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        u = ((xf - np.float32(0) if fmt.signed else xf - z) / s).astype(np.float32)
    return fmt.decode(fmt.encode(u, nan="zero"))


def _inputs(weights: Mapping) -> dict:
    return {k: np.asarray(weights[k]) for k in WEIGHT_INPUTS}


def contract_reference(x: np.ndarray, weights: Mapping, adapter: int, attrs: Mapping) -> np.ndarray:
    """docs/fp4gemm_contract.md 'Semantics' as written; GEMM in float64, result float64."""
    layout, w = Layout.from_attrs(attrs), _inputs(weights)
    xf = np.asarray(x).astype(np.float32)
    fmt = layout.a_fmt
    if fmt is not None:
        s, z = activation_params(xf, fmt, layout.dynamic, w["a_scale"], w["a_zero"])
        xq = (z + s * activation_grid_values(xf, fmt, s, z)).astype(np.float32)
    else:
        xq = xf
    codes = unpack_codes(w["W"], adapter, layout)
    lut = w["w_lut"].astype(np.float32)
    wq = lut[layout.group_of_row()[:, None], codes] * w["w_scale"][:, None]
    yg = xq.astype(np.float64) @ wq.astype(np.float64).T + w["bias"]
    y = np.empty_like(yg)
    y[..., w["perm"]] = yg
    return y


def kernel_model(x: np.ndarray, weights: Mapping, adapter: int, attrs: Mapping,
                 out_dtype=None) -> np.ndarray:
    """What the kernels compute (module docstring), returned in ``out_dtype`` (default X's).

    X may be float32, float16 or a bfloat16 array (ml_dtypes); the result is cast the way the
    kernels cast (round to nearest even).
    """
    layout, w = Layout.from_attrs(attrs), _inputs(weights)
    x = np.asarray(x)
    out_dtype = x.dtype if out_dtype is None else np.dtype(out_dtype)
    xf = x.astype(np.float32)
    lead, K = xf.shape[:-1], xf.shape[-1]
    if K != layout.K:
        raise ValueError(f"X has {K} features, the layer {layout.K}")
    x2 = xf.reshape(-1, K)
    fmt = layout.a_fmt
    if fmt is not None:
        s, z = activation_params(x2, fmt, layout.dynamic, w["a_scale"], w["a_zero"])
        U = activation_grid_values(x2, fmt, s, z)
        s = np.broadcast_to(np.float32(s), (x2.shape[0], 1)).astype(np.float32)
        z = np.broadcast_to(np.float32(z), (x2.shape[0], 1)).astype(np.float32)
    else:
        U = x2
        s = np.ones((x2.shape[0], 1), np.float32)
        z = np.zeros((x2.shape[0], 1), np.float32)
    codes = unpack_codes(w["W"], adapter, layout)
    L = w["w_lut"].astype(np.float32)[layout.group_of_row()[:, None], codes]  # [N, K]
    acc = (U.astype(np.float64) @ L.astype(np.float64).T).astype(np.float32)  # fp32 accumulators
    ws = w["w_scale"].astype(np.float32)
    rowsum = (ws * L.astype(np.float64).sum(1).astype(np.float32)).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        yg = s * (acc * ws[None, :]) + (z * rowsum[None, :] + w["bias"].astype(np.float32)[None, :])
    y = np.empty_like(yg)
    y[:, w["perm"]] = yg
    return y.reshape(*lead, layout.N).astype(out_dtype)


# ---- exactness of operands on the tensor cores (mirrors fp4gemm_numerics.cuh) ---------------
E4M3 = get_format("e4m3")
#: power-of-two shifts tried when fitting a table into E4M3 (the kernels search the same range)
SHIFT_RANGE = range(-16, 17)


def exact_in_e4m3(values: np.ndarray) -> bool:
    v = np.asarray(values, np.float32)
    v = v[~np.isnan(v)]
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.all(np.abs(v) <= E4M3.max) and np.all(E4M3.quantize(v) == v))


def e4m3_shift(values: np.ndarray) -> int | None:
    """The shift t of smallest |t| (ties: t >= 0) with values * 2**t exact in E4M3, or None."""
    v = np.asarray(values, np.float32)
    for t in sorted(SHIFT_RANGE, key=lambda t: (abs(t), -t)):
        if exact_in_e4m3(np.ldexp(v, t)):
            return t
    return None


def exact_in(values: np.ndarray, dtype) -> bool:
    """True when every (non-NaN) value survives a round trip through ``dtype`` (fp16, bf16)."""
    v = np.asarray(values, np.float32)
    v = v[~np.isnan(v)]
    with np.errstate(over="ignore"):
        return bool(np.all(v.astype(dtype).astype(np.float32) == v))


def format_grid(fmt: Format) -> np.ndarray:
    """Every finite value of a format (both zeros), float32."""
    t = fmt.table
    return t[np.isfinite(t)]


# ---- random layers for tests and benchmarks ----------------------------------------------------
def random_layer(rng: np.random.Generator, K: int, w_fmt: str, group_bits: Sequence[int],
                 group_sizes: Sequence[int], a_fmt: str | None, a_mode: str = "static",
                 adapters: int = 1) -> tuple[dict, dict]:
    """(weights, attrs) of a random FP4Gemm layer: the seven constant inputs and the attributes.

    Weight codes are uniform over each group's format (E4M3 NaN codes excluded); scales, zero
    point and bias are drawn so that the output is O(1).
    """
    from exporter.onnx_ops import fp4gemm_attrs

    base = get_format(w_fmt)
    fmts = [with_bits(base, b) for b in group_bits]
    N = int(sum(group_sizes))
    packed = []
    for _ in range(adapters):
        rows = []
        for f, bits, n in zip(fmts, group_bits, group_sizes):
            codes = rng.integers(0, f.num_codes, (n, K))
            if f.nan_code:
                codes = np.where((codes & 0x7F) == 0x7F, 0, codes)
            rows.append(pack(codes, bits, axis=-1).reshape(-1))
        packed.append(np.concatenate(rows) if rows else np.zeros(0, np.uint8))
    lut = np.zeros((len(fmts), 256), np.float32)
    for g, f in enumerate(fmts):
        lut[g, : f.num_codes] = np.nan_to_num(f.table)
    wmax = max(float(np.abs(format_grid(f)).max()) for f in fmts) or 1.0
    a_signed = a_fmt is None or get_format(a_fmt).signed
    weights = {
        "W": np.stack(packed).view(np.int8),
        "w_scale": (rng.uniform(0.5, 1.5, N) / (wmax * np.sqrt(K))).astype(np.float32),
        "w_lut": lut,
        "a_scale": np.array(rng.uniform(0.3, 0.6), np.float32),
        "a_zero": np.array(0.0 if a_signed else rng.uniform(-0.5, -0.1), np.float32),
        "bias": (0.1 * rng.standard_normal(N)).astype(np.float32),
        "perm": rng.permutation(N).astype(np.int32),
    }
    return weights, fp4gemm_attrs(K, N, list(group_bits), list(group_sizes), a_fmt, a_mode)


def random_activations(rng: np.random.Generator, shape: Sequence[int], attrs: Mapping,
                       dtype=np.float32) -> np.ndarray:
    """Activations that exercise the whole grid: mostly N(0, 1) (shifted up for unsigned formats,
    as post-GELU activations are), with a few outliers per row."""
    x = rng.standard_normal(shape).astype(np.float32)
    if int(attrs["a_ebits"]) and not int(attrs["a_signed"]):
        x = np.maximum(x + 0.3, -0.17 + 0.01 * x)
    flat = x.reshape(-1, shape[-1])
    idx = rng.integers(0, shape[-1], (flat.shape[0], 2))
    np.put_along_axis(flat, idx, rng.uniform(-8, 8, idx.shape).astype(np.float32), axis=1)
    return flat.reshape(shape).astype(dtype)
