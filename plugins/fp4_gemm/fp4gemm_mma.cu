// MMA path GEMM (sm_80+; E4M3 operands on sm_89+): Y = epilogue(A * B^T) with A [M, K] the
// quantized activations (or X for W4A16) and B [N_pad, K] the decoded weights, both K-major in
// the workspace, K padded with zeros to a multiple of 128 bytes.
//
// CTA tile 128 x 128 x 128 bytes, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32, 3-stage cp.async
// pipeline. Shared-memory tiles are rows of 128 bytes with the 16-byte chunk c of row r stored at
// chunk c ^ (r % 8): ldmatrix reads and cp.async writes are both free of bank conflicts.
// The operand kinds share one byte layout (a 32-byte K step is k16 for fp16/bf16 and k32 for
// E4M3), so ldmatrix serves all three; only the mma instruction differs.
//
// FP8: the E4M3 tensor cores add into fp32 with a reduced internal precision (measured on Hopper;
// assumed on Ada), so each 128-byte K block accumulates into fresh registers that are then added
// into the fp32 accumulators with FADDs, as in the wgmma kernel.
//
// Epilogue: lane q of a warp holds output columns [8 q, 8 q + 8) of the warp's 32 (the decode pass
// stored the weight rows in that order, fp4gemm_numerics.cuh epilogue_col_to_output), so every
// row of 8 outputs is one 16-byte store:
//     y = s_m * (acc * col_scale[n]) + (z_m * col_rowsum[n] + col_bias[n])
#include "fp4gemm_common.cuh"

namespace fp4g {
namespace {

constexpr int kBM = 128, kBN = 128, kBKB = 128, kStages = 3, kThreads = 256;
constexpr int kStageBytes = (kBM + kBN) * kBKB;
constexpr int kSmemBytes = kStages * kStageBytes;
static_assert(kMmaColBlock == 32, "warp tile N is the epilogue column block");

FP4G_DEV uint32_t swz(int r, int c) { return static_cast<uint32_t>(r * kBKB + ((c ^ (r & 7)) << 4)); }

template <int Kind>
__global__ void __launch_bounds__(kThreads, 1) gemm_mma_kernel(GemmArgs g) {
    if (g.flags != nullptr && (((*g.flags & kFlagFp8) != 0) != (g.run_if_fp8 != 0))) return;
    extern __shared__ __align__(128) uint8_t smem[];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp >> 2, wn = warp & 3;
    const int64_t bm = static_cast<int64_t>(blockIdx.y) * kBM;
    const int bn = blockIdx.x * kBN;
    const int KT = g.k_bytes / kBKB;
    const uint32_t smem0 = smem_u32(smem);

    auto load_stage = [&](int kt, int s) {
        const uint32_t a_s = smem0 + s * kStageBytes;
        const uint32_t b_s = a_s + kBM * kBKB;
        const int64_t kbyte0 = static_cast<int64_t>(kt) * kBKB;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int id = tid + i * kThreads;
            const int r = id >> 3, c = id & 7;
            const int64_t kbyte = kbyte0 + c * 16;
            const int64_t m = bm + r;
            const uint8_t* src = g.a;
            int n = 0;
            if (m < g.M) {
                const int64_t rem = g.a_valid_bytes - kbyte;
                n = rem >= 16 ? 16 : (rem > 0 ? static_cast<int>(rem) : 0);
                if (n > 0) src = g.a + m * g.lda_bytes + kbyte;
            }
            cp_async_16(a_s + swz(r, c), src, n);
            cp_async_16(b_s + swz(r, c), g.b + static_cast<int64_t>(bn + r) * g.ldb_bytes + kbyte, 16);
        }
    };

    constexpr bool kPromote = Kind == kElemE4M3;
    float acc[4][4][4];
    float part[4][4][4];  // FP8: this K block's sums
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = part[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < KT) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        cp_async_wait<kStages - 2>();
        __syncthreads();  // stage kt landed for everyone; stage kt - 1 is free to overwrite
        {
            const int nk = kt + kStages - 1;
            if (nk < KT) load_stage(nk, nk % kStages);
            cp_async_commit();
        }
        const uint32_t a_s = smem0 + (kt % kStages) * kStageBytes;
        const uint32_t b_s = a_s + kBM * kBKB;
#pragma unroll
        for (int ks = 0; ks < kBKB / 32; ++ks) {
            uint32_t af[4][4], bf[4][2];
            const int mi = lane >> 3;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = wm * 64 + i * 16 + (mi & 1) * 8 + (lane & 7);
                ldmatrix_x4(af[i], a_s + swz(r, 2 * ks + (mi >> 1)));
            }
#pragma unroll
            for (int jp = 0; jp < 2; ++jp) {
                const int r = wn * 32 + (2 * jp + (mi >> 1)) * 8 + (lane & 7);
                uint32_t t[4];
                ldmatrix_x4(t, b_s + swz(r, 2 * ks + (mi & 1)));
                bf[2 * jp][0] = t[0];
                bf[2 * jp][1] = t[1];
                bf[2 * jp + 1][0] = t[2];
                bf[2 * jp + 1][1] = t[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_16x8<Kind>(kPromote ? part[i][j] : acc[i][j], af[i], bf[j]);
        }
        if constexpr (kPromote) {
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        acc[i][j][e] += part[i][j][e];
                        part[i][j][e] = 0.0f;
                    }
        }
    }
    cp_async_wait<0>();

    // epilogue
    const GemmEpilogue& ep = g.epi;
    const int gq = lane >> 2, q = lane & 3;
    const int n0 = bn + wn * 32 + 8 * q;  // this lane's 8 output columns
    float cs[8], cb[8], cr[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        cs[e] = ep.col_scale[n0 + e];
        cb[e] = ep.col_bias[n0 + e];
        cr[e] = ep.col_rowsum != nullptr ? ep.col_rowsum[n0 + e] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t m = bm + wm * 64 + i * 16 + gq + 8 * h;
            if (m >= g.M) continue;
            const float s = ep.row_scale != nullptr ? ep.row_scale[m] : 1.0f;
            const float z = ep.row_zero != nullptr ? ep.row_zero[m] : 0.0f;
            float v[8];
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = 2 * j + e;
                    v[c] = s * (acc[i][j][2 * h + e] * cs[c]) + (z * cr[c] + cb[c]);
                }
            const int64_t base = m * g.N + n0;
            if (ep.vec_ok && n0 + 8 <= g.N) {
                store_out8(ep.y, base, ep.dtype, v);
            } else {
#pragma unroll
                for (int c = 0; c < 8; ++c)
                    if (n0 + c < g.N) store_out(ep.y, base + c, ep.dtype, v[c]);
            }
        }
    }
}

template <int Kind>
cudaError_t launch_kind(const GemmArgs& g, cudaStream_t stream) {
    static bool configured = false;  // benign race: every thread sets the same attribute
    if (!configured) {
        const cudaError_t e = cudaFuncSetAttribute(gemm_mma_kernel<Kind>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
        if (e != cudaSuccess) return e;
        configured = true;
    }
    const int64_t mt = (g.M + kBM - 1) / kBM;
    if (mt > 65535) return cudaErrorInvalidValue;
    const dim3 grid(g.N_pad / kBN, static_cast<unsigned>(mt));
    gemm_mma_kernel<Kind><<<grid, kThreads, kSmemBytes, stream>>>(g);
    return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemm_mma(const GemmArgs& g, cudaStream_t stream) {
    if (g.M == 0) return cudaSuccess;
    switch (g.kind) {
        case kElemE4M3: return launch_kind<kElemE4M3>(g, stream);
        case kElemF16: return launch_kind<kElemF16>(g, stream);
        default: return launch_kind<kElemBF16>(g, stream);
    }
}

}  // namespace fp4g
