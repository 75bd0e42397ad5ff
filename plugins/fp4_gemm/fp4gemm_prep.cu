// The pass that prepares the GEMM operands of the MMA/WGMMA paths, one launch with two jobs:
//   decode (the first decode_blocks CTAs): packed codes -> E4M3 (or fp16/bf16) rows in epilogue
//          column order, the per-column epilogue vectors and the flags word;
//   quantize (the other CTAs, one warp per row): activations -> per-row scale/zero point, and the
//          grid values as E4M3/fp16 (or X copied into a K-padded buffer for W4A16).
// Both jobs read the decode tables and decide FP8 vs fp16 from them (every CTA reaches the same
// verdict), so they need no ordering between them and run side by side. SIMT and SMALLM launch
// the quantize job alone (stats, fp16 grid values).
#include "fp4gemm_common.cuh"

namespace fp4g {
namespace {

constexpr int kDecodeWarps = 8;

// Per-CTA tables of every group: float values, E4M3 bytes (shifted), 16-bit bits.
struct DecodeShared {
    float lutf[kMaxGroups][256];
    uint16_t lut16[kMaxGroups][256];
    uint8_t lut8[kMaxGroups][256];
    int32_t shift[kMaxGroups];
    int32_t fp8_ok;
    int32_t inexact16;
};

__device__ uint16_t to_bits16(float v, int kind16) {
    if (kind16 == kElemF16) {
        __half h = __float2half_rn(v);
        return *reinterpret_cast<uint16_t*>(&h);
    }
    __nv_bfloat16 h = __float2bfloat16_rn(v);
    return *reinterpret_cast<uint16_t*>(&h);
}

__device__ float from_bits16(uint16_t b, int kind16) {
    if (kind16 == kElemF16) return __half2float(*reinterpret_cast<__half*>(&b));
    return __bfloat162float(*reinterpret_cast<__nv_bfloat16*>(&b));
}

// Builds the tables; every CTA computes the same result (no inter-CTA dependency).
__device__ void build_tables(const LayerDesc& L, const float* w_lut, int kind16, int allow_fp8,
                             DecodeShared& sh) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) {
        sh.fp8_ok = allow_fp8;
        sh.inexact16 = 0;
    }
    __syncthreads();
    for (int g = warp; g < L.G; g += kDecodeWarps) {
        const int n = 1 << L.bits[g];
        ShiftRange r = shift_range_init();
        int inexact = 0;
        for (int c = lane; c < n; c += 32) {
            const float v = w_lut[g * 256 + c];
            sh.lutf[g][c] = v;
            r = shift_range_add(r, v);
            const uint16_t b16 = to_bits16(v, kind16);
            sh.lut16[g][c] = b16;
            const float back = from_bits16(b16, kind16);
            inexact |= !(back == v || (is_nan(v) && is_nan(back)));
        }
        for (int o = 16; o > 0; o >>= 1) {
            r.lo = max(r.lo, __shfl_xor_sync(0xffffffffu, r.lo, o));
            r.hi = min(r.hi, __shfl_xor_sync(0xffffffffu, r.hi, o));
        }
        inexact = __any_sync(0xffffffffu, inexact);
        const int t = shift_choose(r);
        if (lane == 0) {
            sh.shift[g] = t;
            if (t == kNoShift) atomicAnd(&sh.fp8_ok, 0);
            if (inexact) atomicOr(&sh.inexact16, 1);
        }
    }
    __syncthreads();
    if (sh.fp8_ok) {
        for (int g = warp; g < L.G; g += kDecodeWarps) {
            const int n = 1 << L.bits[g];
            const float scale = pow2(sh.shift[g]);
            for (int c = lane; c < n; c += 32) sh.lut8[g][c] = e4m3_bits_of_exact(sh.lutf[g][c] * scale);
        }
    }
    __syncthreads();
}

// Decode job, CTA `block`: one warp per output column, grouped row j = block * 8 + warp
// (j >= N: a padding row).
__device__ void decode_part(const LayerDesc& L, const Operands& op, const Workspace& ws, int col_block,
                            const DecodeShared& sh, int block) {
    int64_t adapter = read_adapter(op);
    const bool adapter_ok = adapter >= 0 && adapter < L.num_adapters;
    if (!adapter_ok) adapter = 0;
    const bool fp8 = sh.fp8_ok != 0;
    const int ebytes = fp8 ? 1 : 2;
    const int K_pad = static_cast<int>(round_up(L.K, kKPad));
    const int N_pad = static_cast<int>(round_up(L.N, kTileN));

    if (block == 0) {  // the flags word: a plain store of values every CTA agrees on
        __shared__ int bad_perm;
        if (threadIdx.x == 0) bad_perm = 0;
        __syncthreads();
        for (int j = threadIdx.x; j < L.N; j += blockDim.x) {
            const int n = op.perm[j];
            if (n < 0 || n >= L.N) bad_perm = 1;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            ws.flags[0] = (fp8 ? kFlagFp8 : 0) | (sh.inexact16 && !fp8 ? kFlagInexact16 : 0) |
                          (adapter_ok ? 0 : kFlagBadAdapter) | (bad_perm ? kFlagBadPerm : 0);
        }
    }

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = block * kDecodeWarps + warp;
    if (j >= N_pad) return;
    int n;
    int g = 0;
    if (j < L.N) {
        n = op.perm[j];
        if (n < 0 || n >= L.N) return;
        g = group_of_row(L, j);
    } else {
        n = j;  // padding column: zero row, zero vectors
    }
    const int64_t row_out = (n / col_block) * col_block + epilogue_output_to_col(n % col_block, col_block);
    uint8_t* dst = ws.b + row_out * K_pad * ebytes;

    float rowsum = 0.0f;
    if (j < L.N) {
        const int bits = L.bits[g];
        const int rb = L.row_bytes[g];
        const uint8_t* src = op.w + adapter * L.adapter_bytes + L.byte0[g] +
                             static_cast<int64_t>(j - L.row0[g]) * rb;
        const bool fast4 = bits == 4 && (reinterpret_cast<uintptr_t>(src) & 3) == 0;
        for (int c8 = lane; c8 < K_pad / 8; c8 += 32) {
            const int k0 = c8 * 8;
            uint32_t codes[8];
            if (k0 < L.K) {
                uint64_t word;
                if (fast4 && k0 + 8 <= L.K) {
                    word = *reinterpret_cast<const uint32_t*>(src + c8 * 4);
                } else {
                    word = load_code_group(src + c8 * bits, bits, rb - c8 * bits);
                }
#pragma unroll
                for (int i = 0; i < 8; ++i) codes[i] = code_at(word, bits, i);
            }
            if (fp8) {
                uint32_t lo = 0, hi = 0;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (k0 + i < L.K) {
                        const uint32_t b = sh.lut8[g][codes[i]];
                        if (i < 4) lo |= b << (8 * i); else hi |= b << (8 * (i - 4));
                        rowsum += sh.lutf[g][codes[i]];
                    }
                }
                *reinterpret_cast<uint2*>(dst + k0) = make_uint2(lo, hi);
            } else {
                uint32_t w4[4] = {0, 0, 0, 0};
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (k0 + i < L.K) {
                        w4[i >> 1] |= static_cast<uint32_t>(sh.lut16[g][codes[i]]) << (16 * (i & 1));
                        rowsum += sh.lutf[g][codes[i]];
                    }
                }
                *reinterpret_cast<uint4*>(dst + 2 * k0) = make_uint4(w4[0], w4[1], w4[2], w4[3]);
            }
        }
    } else {
        for (int c8 = lane; c8 < K_pad / 8; c8 += 32) {
            if (fp8) {
                *reinterpret_cast<uint2*>(dst + c8 * 8) = make_uint2(0, 0);
            } else {
                *reinterpret_cast<uint4*>(dst + c8 * 16) = make_uint4(0, 0, 0, 0);
            }
        }
    }
    rowsum = warp_sum(rowsum);
    if (lane == 0) {
        if (j < L.N) {
            const float s = op.w_scale[j];
            float cs = fp8 ? s * pow2(-sh.shift[g]) : s;
            if (!adapter_ok) cs = __int_as_float(0x7fc00000);  // NaN: a visible wrong answer
            ws.col_scale[n] = cs;
            ws.col_bias[n] = op.bias[j];
            ws.col_rowsum[n] = s * rowsum;
        } else {
            ws.col_scale[n] = 0.0f;
            ws.col_bias[n] = 0.0f;
            ws.col_rowsum[n] = 0.0f;
        }
    }
}

// ---- activations ---------------------------------------------------------------------------------
constexpr int kQuantWarps = 8;

template <typename T>
__device__ void load8(const T* row, int k0, int K, bool vec, float (&v)[8]) {
    if (vec && k0 + 8 <= K) {
        if constexpr (sizeof(T) == 2) {
            const uint4 raw = *reinterpret_cast<const uint4*>(row + k0);
            const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = to_float<T>(h[i]);
        } else {
            const float4 a = *reinterpret_cast<const float4*>(row + k0);
            const float4 b = *reinterpret_cast<const float4*>(row + k0 + 4);
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = k0 + i < K ? to_float<T>(row[k0 + i]) : 0.0f;
    }
}

// Quantize job, CTA `block`: one warp per row. Dynamic mode reads the row twice (stats, then
// codes); the second read is served by L1/L2.
template <typename T>
__device__ void quantize_part(const LayerDesc& L, const Operands& op, const Workspace& ws, int mode,
                              int64_t lda, int vec, int64_t block) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t m = block * kQuantWarps + warp;
    if (m >= op.M) return;
    const T* row = static_cast<const T*>(op.x) + m * L.K;
    const int K = L.K;

    float s = 1.0f, z = 0.0f;
    if (L.act_quant) {
        const ActFormat& f = L.act;
        if (!L.dynamic) {
            s = *op.a_scale;
            z = f.is_signed ? 0.0f : *op.a_zero;
        } else {
            float lo = INFINITY, hi = -INFINITY, amax = 0.0f;
            for (int k0 = lane * 8; k0 < K; k0 += 256) {
                float v[8];
                load8(row, k0, K, vec, v);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    if (k0 + i < K) {
                        lo = fminf(lo, v[i]);
                        hi = fmaxf(hi, v[i]);
                        amax = fmaxf(amax, fabsf(v[i]));
                    }
                }
            }
            if (f.is_signed) {
                s = fmaxf(__fdiv_rn(warp_max(amax), f.maxval), 1e-8f);
            } else {
                lo = warp_min(lo);
                hi = warp_max(hi);
                z = lo;
                s = fmaxf(__fdiv_rn(__fsub_rn(hi, lo), f.maxval), 1e-8f);
            }
        }
    }
    if (lane == 0) {
        ws.row_scale[m] = mode == kQuantE4M3 ? s * pow2(-L.act_shift) : s;
        ws.row_zero[m] = z;
    }
    if (mode == kQuantStats) return;

    const float rcp = __frcp_rn(s);
    const float up = mode == kQuantE4M3 ? pow2(L.act_shift) : 1.0f;
    const int K_pad = static_cast<int>(round_up(K, kKPad));
    for (int k0 = lane * 8; k0 < K_pad; k0 += 256) {
        float v[8];
        load8(row, k0, K, vec, v);  // zeros past K
        if (mode == kQuantCopy) {   // W4A16 with a K that TMA/cp.async cannot address directly
            uint32_t w4[4];
            for (int i = 0; i < 4; ++i) {
                if constexpr (sizeof(T) == 2) {
                    T h[2] = {static_cast<T>(v[2 * i]), static_cast<T>(v[2 * i + 1])};
                    w4[i] = *reinterpret_cast<uint32_t*>(h);
                } else {
                    w4[i] = 0;  // not used: fp32 W4A16 runs on the SIMT path
                }
            }
            *reinterpret_cast<uint4*>(ws.a + (m * lda + k0) * 2) = make_uint4(w4[0], w4[1], w4[2], w4[3]);
            continue;
        }
        float q[8];
        for (int i = 0; i < 8; ++i) {
            q[i] = k0 + i < K ? quantize_activation(v[i], s, rcp, z, L.act) : 0.0f;
        }
        if (mode == kQuantE4M3) {
            const uint32_t lo = pack_e4m3x2(q[0] * up, q[1] * up) | (pack_e4m3x2(q[2] * up, q[3] * up) << 16);
            const uint32_t hi = pack_e4m3x2(q[4] * up, q[5] * up) | (pack_e4m3x2(q[6] * up, q[7] * up) << 16);
            *reinterpret_cast<uint2*>(ws.a + m * lda + k0) = make_uint2(lo, hi);  // 1-byte elements
        } else {
            uint32_t w4[4];
            for (int i = 0; i < 4; ++i) {
                __half2 h = __floats2half2_rn(q[2 * i], q[2 * i + 1]);
                w4[i] = *reinterpret_cast<uint32_t*>(&h);
            }
            *reinterpret_cast<uint4*>(ws.a + (m * lda + k0) * 2) = make_uint4(w4[0], w4[1], w4[2], w4[3]);
        }
    }
}

template <typename T>
__global__ void __launch_bounds__(kDecodeWarps * 32) prep_kernel(LayerDesc L, Operands op, Workspace ws, PrepArgs a) {
    __shared__ DecodeShared sh;
    if (a.decode_blocks > 0 || a.qmode == kQuantAuto) build_tables(L, op.w_lut, a.kind16, a.allow_fp8, sh);
    if (static_cast<int>(blockIdx.x) < a.decode_blocks) {
        decode_part(L, op, ws, a.col_block, sh, blockIdx.x);
        return;
    }
    const int mode = a.qmode == kQuantAuto ? (sh.fp8_ok ? kQuantE4M3 : kQuantF16) : a.qmode;
    quantize_part<T>(L, op, ws, mode, a.lda, a.vec, static_cast<int64_t>(blockIdx.x) - a.decode_blocks);
}

}  // namespace

cudaError_t launch_prep(const LayerDesc& L, const Operands& op, const Workspace& ws, PrepArgs a,
                        cudaStream_t stream) {
    const int N_pad = static_cast<int>(round_up(L.N, kTileN));
    a.decode_blocks = a.decode ? (N_pad + kDecodeWarps - 1) / kDecodeWarps : 0;
    const int64_t quant_blocks = a.qmode == kQuantNone ? 0 : (op.M + kQuantWarps - 1) / kQuantWarps;
    const int64_t blocks = a.decode_blocks + quant_blocks;
    if (blocks == 0) return cudaSuccess;
    if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
    const int esize = dtype_bytes(op.dtype);
    a.vec = (static_cast<int64_t>(L.K) * esize) % 16 == 0 && (reinterpret_cast<uintptr_t>(op.x) & 15) == 0;
    const dim3 grid(static_cast<unsigned>(blocks));
    switch (op.dtype) {
        case FP4GEMM_F32: prep_kernel<float><<<grid, kDecodeWarps * 32, 0, stream>>>(L, op, ws, a); break;
        case FP4GEMM_F16: prep_kernel<__half><<<grid, kDecodeWarps * 32, 0, stream>>>(L, op, ws, a); break;
        default: prep_kernel<__nv_bfloat16><<<grid, kDecodeWarps * 32, 0, stream>>>(L, op, ws, a); break;
    }
    return cudaGetLastError();
}

cudaError_t launch_quantize_rows(const LayerDesc& L, const Operands& op, const Workspace& ws,
                                 int mode, int64_t lda, cudaStream_t stream) {
    PrepArgs a{};
    a.qmode = mode;
    a.lda = lda;
    return launch_prep(L, op, ws, a, stream);
}

}  // namespace fp4g
