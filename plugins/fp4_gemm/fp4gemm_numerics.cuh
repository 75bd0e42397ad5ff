// Scalar numerics of the FP4Gemm kernels, shared by device code and the CPU tests.
//
// Every function here is __host__ __device__: the kernels call them, and fp4gemm_host_check.cu
// exposes them to Python so that tests/test_fp4gemm_kernels.py compares them with
// exporter.formats on millions of values without a GPU. Keep them free of device-only intrinsics
// (or give both branches).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#ifdef __CUDACC__
#define FP4G_HD __host__ __device__ __forceinline__
#else
#define FP4G_HD inline
#endif

namespace fp4g {

// ---- bit casts and exact powers of two ---------------------------------------------------------
FP4G_HD uint32_t f2u(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}

FP4G_HD float u2f(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

// 2**e for e in [-126, 127] (normal float32 range), exact.
FP4G_HD float pow2(int e) { return u2f(static_cast<uint32_t>(e + 127) << 23); }

FP4G_HD float fmul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);  // never contracted into an FMA
#else
    return a * b;  // host code is compiled with -ffp-contract=off
#endif
}

FP4G_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
    return __fmaf_rn(a, b, c);
#else
    return std::fmaf(a, b, c);
#endif
}

FP4G_HD float rint_rn(float x) {
#ifdef __CUDA_ARCH__
    return rintf(x);  // cvt.rni: round half to even
#else
    return std::nearbyintf(x);  // default rounding mode: to nearest, ties to even
#endif
}

FP4G_HD bool is_nan(float x) { return (f2u(x) & 0x7fffffffu) > 0x7f800000u; }

// ---- division by the scale -------------------------------------------------------------------
FP4G_HD float div_ieee(float d, float s) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(d, s);
#else
    return d / s;
#endif
}

// u = d / s must be the IEEE (correctly rounded) quotient: the codes must match PyTorch's and the
// ONNX body's true division. With rcp = RN(1/s) computed once per tensor or token, Markstein's
// theorem gives the correctly rounded quotient in three operations: q0 = RN(d * rcp) is within
// one ulp, the remainder d - q0 * s is exact through an FMA, and RN(q0 + rem * rcp) = RN(d / s)
// as long as nothing overflows or underflows. That holds for d = 0 or 2^-60 <= |d|, and
// 2^-60 <= |s| <= 2^60 (the remainder then stays a normal float32); everything else (tiny or
// non-finite operands, an overflowing quotient) takes IEEE division, so the result is always
// the IEEE quotient, bit for bit (the CPU tests check it on random and edge-case inputs).
FP4G_HD float div_by_scale(float d, float s, float rcp) {
    const uint32_t ad = f2u(d) & 0x7fffffffu, as = f2u(s) & 0x7fffffffu;
    constexpr uint32_t k2m60 = 67u << 23, k2p60 = 187u << 23;  // 2^-60, 2^60
    if ((ad != 0 && ad < k2m60) || as < k2m60 || as > k2p60) return div_ieee(d, s);
    const float q0 = fmul_rn(d, rcp);
    const float rem = fma_rn(-q0, s, d);
    const float q = fma_rn(rem, rcp, q0);
    if ((f2u(q) & 0x7fffffffu) >= 0x7f800000u) return div_ieee(d, s);  // inf / NaN: d not finite, or overflow
    // a zero quotient carries the sign of d / s, as IEEE division's does (-0 encodes as -0)
    return q == 0.0f ? u2f((f2u(d) ^ f2u(s)) & 0x80000000u) : q;
}

// ---- activation minifloat (the contract's a_* attributes) --------------------------------------
struct ActFormat {
    int32_t is_signed;
    int32_t mbits;
    int32_t emin, emax;  // exponents of the smallest and largest normal binade
    int32_t nan_code;    // 1 for E4M3 (OCP E4M3FN): NaN stays NaN; else NaN encodes as 0
    float maxval;        // value of the largest code (a_max_code)
};

// The format of the a_* attributes (a_ebits > 0). exporter.formats' table formula.
FP4G_HD ActFormat make_act_format(int is_signed, int ebits, int mbits, int bias, int max_code) {
    ActFormat f;
    f.is_signed = is_signed ? 1 : 0;
    f.mbits = mbits;
    f.emin = 1 - bias;
    f.emax = (1 << ebits) - 1 - bias;
    f.nan_code = (is_signed && ebits == 4 && mbits == 3) ? 1 : 0;
    const int e_field = max_code >> mbits;
    const int m_field = max_code & ((1 << mbits) - 1);
    // exact: m_field < 2^mbits, exponents within float32's normal range for a_ebits <= 6
    f.maxval = e_field == 0 ? fmul_rn(static_cast<float>(m_field), pow2(f.emin - mbits))
                            : fmul_rn(static_cast<float>((1 << mbits) + m_field),
                                      pow2(e_field - bias - mbits));
    return f;
}

// decode(encode(u)): u rounded to the format's grid, ties to even, saturating at +-maxval, with
// exporter.formats' conventions: -0 and negatives rounding to 0 keep the sign (signed formats),
// unsigned formats clamp negatives to 0, NaN -> 0 (kept only by E4M3). Same algorithm as
// formats._quantize_values: e = clamp(floor(log2 a), emin, emax), q = rint(a * 2^(m-e)) * 2^(e-m).
FP4G_HD float quantize(float u, const ActFormat& f) {
    const uint32_t b = f2u(u);
    if ((b & 0x7fffffffu) > 0x7f800000u) return f.nan_code ? u : 0.0f;
    uint32_t sign = 0;
    float a;
    if (f.is_signed) {
        sign = b & 0x80000000u;
        a = u2f(b & 0x7fffffffu);
    } else {
        a = u > 0.0f ? u : 0.0f;
    }
    // floor(log2 a) from the exponent field; zero and float32 subnormals (field 0) lie below
    // every format's emin (>= -62), infinity (field 255) above every emax: the clamp handles both
    int e = static_cast<int>(f2u(a) >> 23) - 127;
    e = e < f.emin ? f.emin : (e > f.emax ? f.emax : e);
    const float r = rint_rn(fmul_rn(a, pow2(f.mbits - e)));  // exact scaling, then RNE
    float q = fmul_rn(r, pow2(e - f.mbits));
    q = q < f.maxval ? q : f.maxval;  // saturate (infinity too)
    return u2f(f2u(q) | sign);
}

// The activation grid value of x: quantize((x - z) / s). z is 0 for signed formats.
FP4G_HD float quantize_activation(float x, float s, float rcp, float z, const ActFormat& f) {
    const float d = f.is_signed ? x : x - z;
    return quantize(div_by_scale(d, s, rcp), f);
}

// ---- exactness of a table in FP8 E4M3 after a power-of-two shift -------------------------------
// E4M3 (OCP E4M3FN) holds S * 2^p exactly (S odd, n = bitlen(S) significant bits) iff either
// it is normal (2^-6 <= v, n <= 4, v <= 448) or subnormal (v < 2^-6, p >= -9). For a value scaled
// by 2^t that is: n <= 4, p + t >= -9, e + t <= 8 (e = floor(log2 v)), and e + t <= 7 when the
// significand exceeds 1.75 (448 = 1.75 * 2^8). Each value thus bounds t from below and above;
// a table fits iff the intersection is non-empty, and the kernels take the t closest to 0.
struct ShiftRange {
    int32_t lo, hi;  // feasible t in [lo, hi]; lo > hi means infeasible
};

constexpr int kMaxShift = 16;  // |t| searched (plugins/fp4_gemm/reference.py SHIFT_RANGE)

FP4G_HD ShiftRange shift_range_init() { return ShiftRange{-kMaxShift, kMaxShift}; }

FP4G_HD ShiftRange shift_range_add(ShiftRange r, float v) {
    const uint32_t b = f2u(v) & 0x7fffffffu;
    if (b > 0x7f800000u || b == 0) return r;               // NaN (a NaN code) and zeros fit
    if (b == 0x7f800000u) return ShiftRange{1, 0};         // infinity never fits
    int E = static_cast<int>(b >> 23);
    uint32_t sig = b & 0x7fffffu;
    int e;                                                 // floor(log2 v)
    if (E == 0) {                                          // float32 subnormal
        int lz = 0;
        while (!(sig & 0x400000u)) { sig <<= 1; ++lz; }
        e = -127 - lz;
        sig = (sig << 1) & 0x7fffffu;
    } else {
        e = E - 127;
    }
    // significand 1.sig: trailing zeros give the lowest set bit p = e - (23 - tz)
    int tz = 0;
    if (sig == 0) {
        tz = 23;
    } else {
        while (!((sig >> tz) & 1u)) ++tz;
    }
    const int n = 24 - tz;  // significant bits
    const int p = e - (n - 1);
    if (n > 4) return ShiftRange{1, 0};
    const bool above_175 = sig > 0x600000u;  // significand > 1.75
    const int lo = -9 - p;
    const int hi = 8 - e - (above_175 ? 1 : 0);
    if (lo > r.lo) r.lo = lo;
    if (hi < r.hi) r.hi = hi;
    return r;
}

FP4G_HD ShiftRange shift_range_merge(ShiftRange a, ShiftRange b) {
    return ShiftRange{a.lo > b.lo ? a.lo : b.lo, a.hi < b.hi ? a.hi : b.hi};
}

// The chosen shift (closest to 0), or kNoShift when the table does not fit E4M3.
constexpr int kNoShift = 127;

FP4G_HD int shift_choose(ShiftRange r) {
    if (r.lo > r.hi) return kNoShift;
    return r.lo > 0 ? r.lo : (r.hi < 0 ? r.hi : 0);
}

// The E4M3 byte of a value that is exactly representable in E4M3 (NaN -> 0x7F with its sign).
// The tables are checked first (shift_range_*), so no rounding is needed here.
FP4G_HD uint8_t e4m3_bits_of_exact(float v) {
    const uint32_t b = f2u(v);
    const uint32_t s = (b >> 24) & 0x80u;
    const uint32_t a = b & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<uint8_t>(s | 0x7fu);
    if (a == 0) return static_cast<uint8_t>(s);
    const int e = static_cast<int>(a >> 23) - 127;  // exact values are >= 2^-9: float32-normal
    if (e < -6) return static_cast<uint8_t>(s | static_cast<uint32_t>(fmul_rn(u2f(a), 512.0f)));
    return static_cast<uint8_t>(s | (static_cast<uint32_t>(e + 7) << 3) | ((a >> 20) & 7u));
}

// True when v is exactly representable in IEEE fp16 (NaN counts as representable).
FP4G_HD bool exact_in_f16(float v) {
    const uint32_t a = f2u(v) & 0x7fffffffu;
    if (a > 0x7f800000u || a == 0) return true;
    if (a == 0x7f800000u) return false;  // the formats saturate: an infinite table entry is a bug
    const int e = static_cast<int>(a >> 23) - 127;
    if (e > 15 || a > 0x477fe000u) return false;        // above 65504
    const int lsb = e >= -14 ? e - 10 : -24;            // weight of the last fp16 mantissa bit
    if (lsb < -149) return true;
    const int drop = lsb - (e - 23);                    // float32 mantissa bits below it
    if (drop <= 0) return true;
    if (drop > 24) return false;
    const uint32_t sig = (a & 0x7fffffu) | (e >= -126 ? 0x800000u : 0u);
    return (sig & ((1u << drop) - 1u)) == 0;
}

// ---- packed codes (exporter/packing.py: LSB-first bit stream per row) ---------------------------
// Codes k .. k+7 of a row (k a multiple of 8) occupy `bits` whole bytes starting at byte k*bits/8.
// `avail` is how many of those bytes the row still has (the last group may be cut short); bytes
// past it are not read and count as zero.
FP4G_HD uint64_t load_code_group(const uint8_t* p, int bits, int avail) {
    uint64_t w = 0;
    const int nb = bits < avail ? bits : avail;
    for (int i = 0; i < nb; ++i) w |= static_cast<uint64_t>(p[i]) << (8 * i);
    return w;
}

FP4G_HD uint32_t code_at(uint64_t group_word, int bits, int i) {
    return static_cast<uint32_t>((group_word >> (i * bits)) & ((1u << bits) - 1u));
}

// ---- epilogue column order ------------------------------------------------------------------------
// A tensor-core accumulator fragment gives lane q (= lane % 4) of a warp the columns
// c = 8 j + 2 q + e (j = 0 .. T/8 - 1, e = 0, 1) of a T-wide block. The decode pass writes the
// weight rows so that GEMM column c holds output column n = (T/4) q + 2 j + e: each lane then owns
// T/4 consecutive output columns and stores them with 16-byte vector writes.
FP4G_HD int epilogue_col_to_output(int c, int T) {
    const int j = c >> 3, q = (c >> 1) & 3, e = c & 1;
    return (T >> 2) * q + 2 * j + e;
}

FP4G_HD int epilogue_output_to_col(int n, int T) {
    const int quarter = T >> 2;
    const int q = n / quarter, rem = n % quarter;
    return 8 * (rem >> 1) + 2 * q + (rem & 1);
}

}  // namespace fp4g
