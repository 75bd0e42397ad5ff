// SMALLM path: few activation rows (M <= a few dozen). Memory-bound on the packed weights, so
// each weight byte is read once, decoded in registers and fed to m16n8k16 tensor-core MMAs
// (fp16, or bf16 for bf16 W4A16). No workspace copy of the weights is made.
//
// CTA = 4 warps = one tile of 32 grouped rows (inside one group) x one K slice x 16 rows of X.
// Warps take 128-wide K blocks round-robin; lane (g = lane / 4, q = lane % 4) loads codes
// k = 32 q .. 32 q + 31 of the block for weight row g of each n8 tile (one 16-byte load for 4-bit
// codes) and the same 32 activations of rows g and g + 8. MMA step s (0..7) gives the lane's
// k-slots {2q, 2q+1, 2q+8, 2q+9} the values k = 32 q + 4 s + {0, 1, 2, 3} of both operands: a
// permutation of K that both operands share, so the dot products are unchanged.
// A is X itself (W4A16, fp16/bf16) or the fp16 grid values quantize_rows wrote (W4A4; the row
// scales and zero points come with them). The zero-point correction z * rowsum(W) comes from a
// second MMA with an all-ones A operand.
// Split-K across CTAs: partial tiles go to the workspace, and the last CTA of a tile (found with a
// per-tile semaphore) adds them in a fixed order and runs the epilogue.
#include <type_traits>

#include "fp4gemm_common.cuh"

namespace fp4g {
namespace {

constexpr int kWarps = 4;
constexpr int kTileRows = 32;  // weight rows per CTA: 4 n8 tiles
constexpr int kChunkM = 16;    // activation rows per CTA

template <int Kind> __device__ uint32_t pack2(float lo, float hi);
template <> __device__ uint32_t pack2<kElemF16>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ uint32_t pack2<kElemBF16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ void tile_of(const LayerDesc& L, int tile, int& g, int& r0, int& r1) {
    int first = 0;
    for (g = 0; g < L.G; ++g) {
        const int nt = (L.rows[g] + kTileRows - 1) / kTileRows;
        if (tile < first + nt) break;
        first += nt;
    }
    r0 = L.row0[g] + (tile - first) * kTileRows;
    r1 = L.row0[g] + L.rows[g];  // end of the group
}

// 32 activations of one row, k = kbase .. kbase + 31 (zeros past K or past M).
template <typename T>
__device__ void load_a32(const T* a, int64_t lda, int K, int64_t M, int64_t m, int kbase, bool vec,
                         float (&v)[32]) {
    if (m >= M) {
#pragma unroll
        for (int i = 0; i < 32; ++i) v[i] = 0.0f;
        return;
    }
    const T* row = a + m * lda;
    if (vec && kbase + 32 <= K) {
        const uint4* p = reinterpret_cast<const uint4*>(row + kbase);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const uint4 raw = p[c];
            const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[8 * c + i] = to_float<T>(h[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 32; ++i) v[i] = kbase + i < K ? to_float<T>(row[kbase + i]) : 0.0f;
    }
}

template <int Kind>
__global__ void __launch_bounds__(kWarps * 32)
smallm_kernel(LayerDesc L, Operands op, SmallMArgs sa, Workspace ws, int split_k, int32_t* semaphores) {
    using T = typename std::conditional<Kind == kElemBF16, __nv_bfloat16, __half>::type;
    __shared__ uint16_t lut[256];
    __shared__ float red[kWarps][2][4][32][4];  // [warp][acc, rowsum][n8 tile][lane][4]
    __shared__ int is_last;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gq = lane >> 2, q = lane & 3;
    int g, r0, r1;
    tile_of(L, blockIdx.x, g, r0, r1);
    const int bits = L.bits[g];
    const bool need_rowsum = L.act_quant && !L.act.is_signed;

    int64_t adapter = read_adapter(op);
    const bool adapter_ok = adapter >= 0 && adapter < L.num_adapters;
    if (!adapter_ok) adapter = 0;

    for (int c = threadIdx.x; c < (1 << bits); c += blockDim.x) {
        lut[c] = static_cast<uint16_t>(pack2<Kind>(op.w_lut[g * 256 + c], 0.0f) & 0xffffu);
    }
    __syncthreads();

    // activation rows of this lane: g and g + 8 of the 16-row chunk
    const int64_t m_lo = static_cast<int64_t>(blockIdx.z) * kChunkM + gq, m_hi = m_lo + 8;
    const T* a = static_cast<const T*>(sa.a);

    const int kblocks = (L.K + 127) / 128;
    const int kb_begin = static_cast<int>(static_cast<int64_t>(kblocks) * blockIdx.y / split_k);
    const int kb_end = static_cast<int>(static_cast<int64_t>(kblocks) * (blockIdx.y + 1) / split_k);
    const int rb = L.row_bytes[g];
    const uint8_t* wbase = op.w + adapter * L.adapter_bytes + L.byte0[g];
    const bool w_vec = bits == 4 && (rb & 15) == 0 && (reinterpret_cast<uintptr_t>(wbase) & 15) == 0;

    float acc[4][4], accr[4][4];
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] = accr[t][i] = 0.0f;
    const uint32_t ones = pack2<Kind>(1.0f, 1.0f);
    const uint32_t a_ones[4] = {ones, ones, ones, ones};

    for (int kb = kb_begin + warp; kb < kb_end; kb += kWarps) {
        const int kbase = kb * 128 + 32 * q;
        const bool full = w_vec && kbase + 32 <= L.K;
        // issue every weight load of this K block first: the path is bound by DRAM latency
        // (a GEMV needs about the whole weight matrix in flight), so loads must not wait on decode
        uint4 raw[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int j = r0 + t * 8 + gq;
            raw[t] = make_uint4(0, 0, 0, 0);
            if (full && j < r1) {
                raw[t] = __ldg(reinterpret_cast<const uint4*>(wbase + static_cast<int64_t>(j - L.row0[g]) * rb +
                                                               (kbase / 8) * bits));
            }
        }
        uint32_t af[8][4];
        {
            float lo[32], hi[32];
            load_a32<T>(a, sa.lda, L.K, op.M, m_lo, kbase, sa.vec, lo);
            load_a32<T>(a, sa.lda, L.K, op.M, m_hi, kbase, sa.vec, hi);
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                af[s][0] = pack2<Kind>(lo[4 * s], lo[4 * s + 1]);
                af[s][1] = pack2<Kind>(hi[4 * s], hi[4 * s + 1]);
                af[s][2] = pack2<Kind>(lo[4 * s + 2], lo[4 * s + 3]);
                af[s][3] = pack2<Kind>(hi[4 * s + 2], hi[4 * s + 3]);
            }
        }
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const int j = r0 + t * 8 + gq;  // weight row of this lane in n8 tile t
            const bool row_ok = j < r1;
            uint32_t codes[32];
            if (full) {
                const uint32_t w4[4] = {raw[t].x, raw[t].y, raw[t].z, raw[t].w};
#pragma unroll
                for (int i = 0; i < 32; ++i) codes[i] = (w4[i >> 3] >> (4 * (i & 7))) & 15u;
            } else if (row_ok && kbase < L.K) {  // other widths, unaligned rows, the K tail
                const uint8_t* src = wbase + static_cast<int64_t>(j - L.row0[g]) * rb + (kbase / 8) * bits;
                const int avail = rb - (kbase / 8) * bits;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const uint64_t word = load_code_group(src + c * bits, bits, avail - c * bits);
#pragma unroll
                    for (int i = 0; i < 8; ++i) codes[8 * c + i] = code_at(word, bits, i);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 32; ++i) codes[i] = 0;
            }
            uint32_t b[8][2];
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                uint32_t h[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int k = kbase + 4 * s + e;
                    h[e] = (row_ok && k < L.K) ? lut[codes[4 * s + e]] : 0u;
                }
                b[s][0] = h[0] | (h[1] << 16);
                b[s][1] = h[2] | (h[3] << 16);
            }
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                mma_16x8<Kind>(acc[t], af[s], b[s]);
                if (need_rowsum) mma_16x8<Kind>(accr[t], a_ones, b[s]);
            }
        }
    }

    // reduce the 4 warps (fixed order), then split-K across CTAs
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            red[warp][0][t][lane][i] = acc[t][i];
            red[warp][1][t][lane][i] = accr[t][i];
        }
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int t = 0; t < 4; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float v = red[0][0][t][lane][i], r = red[0][1][t][lane][i];
            for (int w = 1; w < kWarps; ++w) {
                v += red[w][0][t][lane][i];
                r += red[w][1][t][lane][i];
            }
            acc[t][i] = v;
            accr[t][i] = r;
        }

    if (split_k > 1) {
        const int64_t slot = static_cast<int64_t>(blockIdx.x) * gridDim.z + blockIdx.z;
        float* part = ws.partials + (slot * split_k) * (32 * 32);
        float* mine = part + static_cast<int64_t>(blockIdx.y) * (32 * 32) + lane * 32;
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                mine[4 * t + i] = acc[t][i];
                mine[16 + 4 * t + i] = accr[t][i];
            }
        __threadfence();
        __syncwarp();
        if (lane == 0) {
            const int prev = atomicAdd(&semaphores[slot], 1);
            is_last = prev == split_k - 1;
        }
        __syncwarp();
        if (!is_last) return;
        __threadfence();
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[t][i] = accr[t][i] = 0.0f;
        for (int sk = 0; sk < split_k; ++sk) {
            const float* p = part + static_cast<int64_t>(sk) * (32 * 32) + lane * 32;
#pragma unroll
            for (int t = 0; t < 4; ++t)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    acc[t][i] += __ldcg(p + 4 * t + i);
                    accr[t][i] += __ldcg(p + 16 + 4 * t + i);
                }
        }
        if (lane == 0) semaphores[slot] = 0;  // ready for the next call
    }

    // epilogue: element (row gq / gq + 8, col 2q + e) of n8 tile t
    float s_lo = 1.0f, z_lo = 0.0f, s_hi = 1.0f, z_hi = 0.0f;
    if (sa.row_scale != nullptr) {
        if (m_lo < op.M) { s_lo = sa.row_scale[m_lo]; z_lo = sa.row_zero[m_lo]; }
        if (m_hi < op.M) { s_hi = sa.row_scale[m_hi]; z_hi = sa.row_zero[m_hi]; }
    }
    const float bad = adapter_ok ? 1.0f : __int_as_float(0x7fc00000);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int j = r0 + t * 8 + 2 * q + e;
            if (j >= r1) continue;
            const float wsj = op.w_scale[j] * bad;
            const float bj = op.bias[j];
            const int n = op.perm[j];
            if (n < 0 || n >= L.N) continue;
            const float rowsum = need_rowsum ? wsj * accr[t][e] : 0.0f;
            if (m_lo < op.M) {
                const float y = s_lo * (acc[t][e] * wsj) + (z_lo * rowsum + bj);
                store_out(op.y, m_lo * L.N + n, op.dtype, y);
            }
            if (m_hi < op.M) {
                const float y = s_hi * (acc[t][2 + e] * wsj) + (z_hi * rowsum + bj);
                store_out(op.y, m_hi * L.N + n, op.dtype, y);
            }
        }
    }
}

int count_tiles(const LayerDesc& L) {
    int n = 0;
    for (int g = 0; g < L.G; ++g) n += (L.rows[g] + kTileRows - 1) / kTileRows;
    return n;
}

}  // namespace

cudaError_t launch_smallm(const LayerDesc& L, const Operands& op, const SmallMArgs& sa, const Workspace& ws,
                          int split_k, int32_t* semaphores, cudaStream_t stream) {
    if (op.M == 0) return cudaSuccess;
    const int tiles = count_tiles(L);
    const int64_t chunks = (op.M + kChunkM - 1) / kChunkM;
    if (tiles == 0) return cudaSuccess;
    if (chunks > 65535) return cudaErrorInvalidValue;
    if (semaphores == nullptr) split_k = 1;
    const dim3 grid(tiles, split_k, static_cast<unsigned>(chunks));
    if (sa.kind == kElemBF16) {
        smallm_kernel<kElemBF16><<<grid, kWarps * 32, 0, stream>>>(L, op, sa, ws, split_k, semaphores);
    } else {
        smallm_kernel<kElemF16><<<grid, kWarps * 32, 0, stream>>>(L, op, sa, ws, split_k, semaphores);
    }
    return cudaGetLastError();
}

}  // namespace fp4g
