"""Number formats: one definition drives PyTorch, numpy, ONNX and CUDA.

A format is data (:class:`Format`). Encoding a float to an integer code is the
same short algorithm in every backend, written once over an array namespace
(numpy or torch) in :func:`_encode_magnitude`; decoding is a table lookup in
:attr:`Format.table`, the same table the ONNX function bodies and the CUDA
kernels embed.

Minifloat code layout: ``[sign] exponent mantissa`` from most to least
significant bit; the sign bit exists only for signed formats (unsigned formats
spend it on an extra exponent or mantissa bit). Exponent field 0 is
subnormal: value = 2**(1 - bias) * M / 2**m; else 2**(E - bias) * (1 + M / 2**m).
Every format saturates (no inf codes); only ``e4m3`` (OCP E4M3FN) reserves a
NaN code (magnitude 0x7F).

Encoding rounds to nearest, ties to even, and saturates at +-max (inf too).
Magnitudes are encoded as ``(e - emin) * 2**m + round(|x| * 2**(m - e))`` with
``e = clamp(floor(log2|x|), emin, emax)``: a carry out of the mantissa moves to
the next exponent by itself, and saturation is a clamp on the code. Negative
values that round to zero keep the sign bit (-0, as ml_dtypes does). Unsigned
formats map negative inputs to code 0. NaN: :meth:`Format.encode` raises by
default (``nan="raise"``); ``nan="zero"`` maps NaN to code 0 (the in-model
quantizers and ONNX ops do this), except ``e4m3`` whose NaN code is kept.

Integer formats ``intN`` (two's complement codes, values -2**(N-1)..2**(N-1)-1)
and ``uintN`` (0..2**N-1) round half to even and saturate the same way.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

try:  # torch is a dependency, but formats stay importable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None

NanMode = Literal["raise", "zero"]

_NAMED_ALIASES = {"fp4": "e2m1", "fp8": "e4m3", "nvfp4": "e2m1", "mxfp4": "e2m1"}
_MINIFLOAT_RE = re.compile(r"^(u?)e(\d)m(\d)$")
_INT_RE = re.compile(r"^(u?)int(\d)$")


@dataclass(frozen=True)
class Format:
    """A saturating number format of at most 8 bits.

    kind: "float" (minifloat) or "int". For floats, ``ebits``/``mbits`` are
    the exponent and mantissa field widths and ``bias`` the exponent bias
    (default 2**(ebits-1) - 1, as in OCP FP4/FP6/FP8). ``nan_code`` is True
    only for OCP E4M3FN, whose all-ones magnitude is NaN.
    """

    name: str
    kind: str
    signed: bool
    ebits: int = 0
    mbits: int = 0
    bias: int = 0
    nan_code: bool = False

    # ---- derived data -------------------------------------------------------
    @property
    def bits(self) -> int:
        if self.kind == "int":
            return self.mbits
        return int(self.signed) + self.ebits + self.mbits

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal (subnormals share its step)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        return (1 << self.ebits) - 1 - self.bias

    @property
    def max_code_mag(self) -> int:
        """Largest finite magnitude code (sign bit excluded)."""
        if self.kind == "int":
            return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1
        top = (1 << (self.ebits + self.mbits)) - 1
        return top - 1 if self.nan_code else top

    @property
    def sign_mask(self) -> int:
        return 1 << (self.bits - 1) if self.signed else 0

    @functools.cached_property
    def table(self) -> np.ndarray:
        """float32 value of every code, indexed by code (NaN for NaN codes)."""
        codes = np.arange(self.num_codes, dtype=np.int64)
        if self.kind == "int":
            vals = codes.astype(np.float64)
            if self.signed:
                vals = np.where(codes >= (1 << (self.bits - 1)), vals - self.num_codes, vals)
            return vals.astype(np.float32)
        mag = codes & ((1 << (self.ebits + self.mbits)) - 1)
        e_field = mag >> self.mbits
        m_field = mag & ((1 << self.mbits) - 1)
        frac = m_field / float(1 << self.mbits)
        vals = np.where(
            e_field == 0,
            np.ldexp(frac, self.emin),
            np.ldexp(1.0 + frac, (e_field - self.bias).astype(np.int64)),
        )
        if self.nan_code:
            vals = np.where(mag == (1 << (self.ebits + self.mbits)) - 1, np.nan, vals)
        if self.signed:
            vals = np.where(codes & self.sign_mask, -vals, vals)
        return vals.astype(np.float32)

    @property
    def max(self) -> float:
        """Largest finite value."""
        return float(self.table[self.max_code_mag])

    @property
    def min(self) -> float:
        """Smallest value (-max for signed minifloats, -2**(N-1) for intN, 0 unsigned)."""
        if not self.signed:
            return 0.0
        if self.kind == "int":
            return float(-(1 << (self.bits - 1)))
        return -self.max

    def grid(self) -> np.ndarray:
        """Sorted unique finite values (float32); +0 stands for both zeros."""
        vals = self.table[np.isfinite(self.table)]
        return np.unique(vals + np.float32(0.0))

    # ---- numpy ----------------------------------------------------------------
    def encode(self, x: np.ndarray, nan: NanMode = "raise") -> np.ndarray:
        """float array -> uint8 codes (round to nearest even, saturate)."""
        x = _as_float_array(x, self.name)
        if nan == "raise" and np.isnan(x).any():
            raise ValueError(
                f"{self.name}.encode: input contains NaN; clean the tensor or pass nan='zero' "
                "to map NaN to code 0"
            )
        if nan not in ("raise", "zero"):
            raise ValueError(f"nan must be 'raise' or 'zero', got {nan!r}")
        with np.errstate(over="ignore", invalid="ignore"):
            return _encode(np, self, x)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """uint8 (or any integer) codes -> float32 values."""
        codes = np.asarray(codes)
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"{self.name}.decode expects integer codes, got dtype {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(
                f"{self.name}.decode: codes must lie in [0, {self.num_codes - 1}] for a "
                f"{self.bits}-bit format; got [{codes.min()}, {codes.max()}]"
            )
        return self.table[codes.astype(np.intp)]

    def quantize(self, x: np.ndarray, nan: NanMode = "raise") -> np.ndarray:
        """decode(encode(x)): the nearest representable value, float32."""
        return self.decode(self.encode(x, nan=nan))

    # ---- torch ----------------------------------------------------------------
    def encode_torch(self, x: "torch.Tensor") -> "torch.Tensor":
        """Tensor -> uint8 codes; same codes as :meth:`encode`; NaN -> code 0 (or E4M3 NaN)."""
        _check_torch_float(x, self.name)
        return _encode(torch, self, x.float())

    def decode_torch(self, codes: "torch.Tensor") -> "torch.Tensor":
        """uint8 codes -> float32 tensor."""
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"{self.name}.decode_torch expects integer codes, got {codes.dtype}")
        table = torch.from_numpy(self.table).to(codes.device)
        return table[codes.long()]

    def quantize_torch(self, x: "torch.Tensor", ste: bool = True) -> "torch.Tensor":
        """Round x (already divided by its scale) to the grid, in x's dtype.

        With ``ste`` the backward pass is the identity (straight-through estimator),
        so scales and LoRA weights upstream receive gradients.
        """
        _check_torch_float(x, self.name)
        q = _quantize_values(torch, self, x.float()).to(x.dtype)
        if ste and x.requires_grad:
            return x + (q - x).detach()
        return q


def _as_float_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "f":
        if arr.dtype.kind in "iub":
            raise TypeError(
                f"{name}.encode expects floating-point values, got dtype {arr.dtype}; "
                "cast with .astype(np.float32) if these are real values"
            )
        raise TypeError(f"{name}.encode expects a float array, got dtype {arr.dtype}")
    if arr.dtype == np.float64:  # exact in the algorithm below, keeps float64 references honest
        return arr
    return arr.astype(np.float32)


def _check_torch_float(x, name: str) -> None:
    if torch is None or not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")


# ---- the one algorithm, over an array namespace (numpy or torch) ------------
def _cast(xp, a, kind: str):
    if xp is np:
        return a.astype({"u8": np.uint8, "i64": np.int64}[kind])
    return a.to({"u8": torch.uint8, "i64": torch.int64}[kind])


def _encode_magnitude(xp, fmt: Format, a):
    """Non-negative float magnitudes -> code magnitudes (as floats, exact integers)."""
    if fmt.kind == "int":
        return xp.clip(xp.round(a), 0, fmt.max_code_mag)
    _, ex = xp.frexp(a)  # a = f * 2**ex with f in [0.5, 1): floor(log2 a) = ex - 1
    e = xp.clip(ex - 1, fmt.emin, fmt.emax)
    e = xp.where(a > 0, e, xp.full_like(e, fmt.emin))  # frexp(0) says ex = 0: zero is code 0
    r = xp.round(xp.ldexp(a, fmt.mbits - e))  # exact scaling by a power of two, then RNE
    code = (e - fmt.emin) * float(1 << fmt.mbits) + r
    return xp.clip(code, 0, fmt.max_code_mag)


def _signed_split(xp, fmt: Format, x):
    """(negative?, magnitude) with unsigned formats clamping negatives to 0."""
    if fmt.signed:
        neg = xp.signbit(x)
        return neg, xp.abs(x)
    return None, xp.where(x > 0, x, xp.zeros_like(x))


def _encode(xp, fmt: Format, x):
    nan = xp.isnan(x)
    x = xp.where(nan, xp.zeros_like(x), x)
    if fmt.kind == "int" and fmt.signed:
        # two's complement: the negative range reaches one step further
        v = xp.clip(xp.round(x), fmt.min, fmt.max)
        return _cast(xp, _cast(xp, v, "i64") & (fmt.num_codes - 1), "u8")
    neg, a = _signed_split(xp, fmt, x)
    code = _cast(xp, _encode_magnitude(xp, fmt, a), "i64")
    if fmt.signed:
        code = code | (_cast(xp, neg, "i64") * fmt.sign_mask)
    if fmt.nan_code:
        nan_code = (1 << (fmt.ebits + fmt.mbits)) - 1
        code = xp.where(nan, xp.full_like(code, nan_code), code)
    return _cast(xp, code, "u8")


def _quantize_values(xp, fmt: Format, x):
    """Values of encode(x) without the table gather (same numbers, faster on big tensors)."""
    if fmt.kind == "int" or fmt.nan_code:
        return fmt.decode_torch(_encode(xp, fmt, x))
    x = xp.where(xp.isnan(x), xp.zeros_like(x), x)
    neg, a = _signed_split(xp, fmt, x)
    _, ex = xp.frexp(a)
    e = xp.clip(ex - 1, fmt.emin, fmt.emax)
    q = xp.ldexp(xp.round(xp.ldexp(a, fmt.mbits - e)), e - fmt.mbits)
    q = xp.clip(q, 0, fmt.max)
    if fmt.signed:
        q = xp.where(neg, -q, q)
    return q


# ---- registry -----------------------------------------------------------------
def _minifloat(name: str, signed: bool, ebits: int, mbits: int) -> Format:
    if ebits < 1:
        raise ValueError(f"format {name!r}: a minifloat needs at least 1 exponent bit")
    bits = int(signed) + ebits + mbits
    if not 2 <= bits <= 8:
        raise ValueError(f"format {name!r} has {bits} bits; supported widths are 2..8")
    bias = (1 << (ebits - 1)) - 1
    return Format(name, "float", signed, ebits, mbits, bias, nan_code=(name == "e4m3"))


@functools.lru_cache(maxsize=None)
def get_format(name: str) -> Format:
    """Look up a format by name: ``e2m1``, ``ue3m1``, ``e4m3``, ``int4``, ``uint8`` ...

    Any ``[u]eXmY`` with 2..8 total bits and ``[u]intN`` with N in 2..8 is valid.
    """
    if not isinstance(name, str):
        raise TypeError(f"format name must be a string, got {type(name).__name__}")
    key = _NAMED_ALIASES.get(name.lower(), name.lower())
    m = _MINIFLOAT_RE.match(key)
    if m:
        return _minifloat(key, m.group(1) != "u", int(m.group(2)), int(m.group(3)))
    m = _INT_RE.match(key)
    if m:
        bits = int(m.group(2))
        if not 2 <= bits <= 8:
            raise ValueError(f"format {name!r}: integer widths are 2..8 bits")
        return Format(key, "int", m.group(1) != "u", mbits=bits)
    raise ValueError(
        f"unknown format {name!r}; use a minifloat like 'e2m1', 'ue3m1', 'e4m3' "
        f"or an integer format like 'int4'/'uint4' (see `export-engine list`)"
    )


#: 4-bit formats MSFP searches over (signed for normal layers, unsigned for AALs).
SIGNED_FP4 = ("e1m2", "e2m1", "e3m0")
UNSIGNED_FP4 = ("ue1m3", "ue2m2", "ue3m1", "ue4m0")
#: Formats listed by `export-engine list` (any [u]eXmY / [u]intN also works).
KNOWN_FORMATS = (
    SIGNED_FP4
    + UNSIGNED_FP4
    + ("e2m0", "e1m1", "e2m2", "e1m3", "e3m1", "e2m3", "e3m2", "e4m3")
    + tuple(f"int{b}" for b in range(2, 9))
    + tuple(f"uint{b}" for b in range(2, 9))
)


def with_bits(fmt: Format, bits: int) -> Format:
    """The mixed-precision neighbour of ``fmt`` at ``bits`` total bits.

    Minifloats keep their exponent width and trade mantissa bits; when the
    mantissa is already empty the exponent shrinks instead (e3m0 -> e2m0).
    Integer formats just change width.
    """
    if bits == fmt.bits:
        return fmt
    prefix = "" if fmt.signed else "u"
    if fmt.kind == "int":
        return get_format(f"{prefix}int{bits}")
    ebits = fmt.ebits
    mbits = bits - int(fmt.signed) - ebits
    if mbits < 0:
        ebits, mbits = ebits + mbits, 0
    return get_format(f"{prefix}e{ebits}m{mbits}")
