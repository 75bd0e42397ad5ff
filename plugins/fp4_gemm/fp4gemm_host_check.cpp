// Host build of the kernels' scalar numerics (fp4gemm_numerics.cuh), for the CPU tests: the same
// source the device code compiles, exposed through a C ABI so that tests/test_fp4gemm_kernels.py
// can compare it with exporter.formats / exporter.packing on millions of values.
// Compiled with -ffp-contract=off (the device code uses explicit __fmul_rn / __fmaf_rn).
#include <cstdint>

#include "fp4gemm_numerics.cuh"

using namespace fp4g;

extern "C" {

// quantize((x - z) / s) per element; div_mode 0: Markstein (kernels), 1: IEEE division.
void fp4g_check_quantize_activation(const float* x, float* out, int64_t n, float s, float z, int is_signed,
                                    int ebits, int mbits, int bias, int max_code, int div_mode) {
    const ActFormat f = make_act_format(is_signed, ebits, mbits, bias, max_code);
    const float rcp = 1.0f / s;
    for (int64_t i = 0; i < n; ++i) {
        if (div_mode == 0) {
            out[i] = quantize_activation(x[i], s, rcp, z, f);
        } else {
            const float d = f.is_signed ? x[i] : x[i] - z;
            out[i] = quantize(d / s, f);
        }
    }
}

void fp4g_check_quantize(const float* u, float* out, int64_t n, int is_signed, int ebits, int mbits, int bias,
                         int max_code) {
    const ActFormat f = make_act_format(is_signed, ebits, mbits, bias, max_code);
    for (int64_t i = 0; i < n; ++i) out[i] = quantize(u[i], f);
}

float fp4g_check_format_max(int is_signed, int ebits, int mbits, int bias, int max_code) {
    return make_act_format(is_signed, ebits, mbits, bias, max_code).maxval;
}

// out[i] = div_by_scale(d[i], s[i], 1 / s[i])
void fp4g_check_div(const float* d, const float* s, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = div_by_scale(d[i], s[i], 1.0f / s[i]);
}

// Shift that fits values into E4M3 (kNoShift = 127 when none).
int fp4g_check_e4m3_shift(const float* v, int64_t n) {
    ShiftRange r = shift_range_init();
    for (int64_t i = 0; i < n; ++i) r = shift_range_add(r, v[i]);
    return shift_choose(r);
}

void fp4g_check_e4m3_bits(const float* v, uint8_t* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = e4m3_bits_of_exact(v[i]);
}

void fp4g_check_exact_f16(const float* v, uint8_t* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = exact_in_f16(v[i]) ? 1 : 0;
}

// Unpacks `rows` rows of `row_bytes` bytes (codes of `bits` bits, K per row) the way the decode
// pass and the SMALLM kernel read them: 8 codes at a time, never past the row's last byte.
void fp4g_check_unpack(const uint8_t* packed, int64_t rows, int row_bytes, int bits, int K, uint8_t* codes) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint8_t* src = packed + r * row_bytes;
        for (int c8 = 0; c8 * 8 < K; ++c8) {
            const uint64_t w = load_code_group(src + c8 * bits, bits, row_bytes - c8 * bits);
            for (int i = 0; i < 8 && c8 * 8 + i < K; ++i) codes[r * K + c8 * 8 + i] = static_cast<uint8_t>(code_at(w, bits, i));
        }
    }
}

int fp4g_check_col_to_output(int c, int T) { return epilogue_col_to_output(c, T); }
int fp4g_check_output_to_col(int n, int T) { return epilogue_output_to_col(n, T); }

}  // extern "C"
