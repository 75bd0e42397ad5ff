// WGMMA path GEMM (sm_90a, H100/H200): the same operands and epilogue as fp4gemm_mma.cu, on the
// instruction that reaches Hopper's tensor-core rate.
//
// CTA = 3 warpgroups: WG0 is the producer (one thread issues TMA bulk tensor copies of the A and B
// tiles into a 5-stage ring, completing on mbarriers), WG1 and WG2 are consumers, each owning 64 of
// the CTA's 128 rows and issuing wgmma m64n128 (k32 for E4M3, k16 for fp16/bf16: 32 bytes of K
// either way) with both operands read from shared memory through matrix descriptors.
// Tiles are 128 rows x 128 bytes of K, written by TMA with the 128-byte swizzle, which is the
// layout the descriptors name (K-major, swizzle mode 1, SBO = 1024 bytes = 8 rows, LBO unused);
// the k-th 32-byte step inside a tile advances the descriptor's start address by 32 bytes.
//
// FP8 accumulation: Hopper's E4M3 wgmma adds into its fp32 accumulators with a reduced internal
// precision (about 14 bits, truncating). As DeepSeek-V3 does, each 128-byte K block (4 wgmma)
// accumulates into fresh registers (scale-d = 0 on the first) that are then added into the fp32
// accumulators with ordinary FADDs ("promotion"). fp16/bf16 accumulate in place.
//
// Epilogue: the decode pass wrote weight rows so that lane q of each warp owns output columns
// [32 q, 32 q + 32) of the CTA's 128 (fp4gemm_numerics.cuh, T = 128): four 16-byte stores per row.
#include <cuda.h>
#include <cudaTypedefs.h>

#include "fp4gemm_common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FP4G_WGMMA_DEVICE 1
#else
#define FP4G_WGMMA_DEVICE 0
#endif

namespace fp4g {
namespace {

constexpr int kBM = 128, kBN = 128, kBKB = 128, kStages = 5;
constexpr int kTileBytes = kBM * kBKB;  // A and B tiles are both 128 x 128 bytes
constexpr int kStageBytes = 2 * kTileBytes;
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + slack for 1024-byte alignment
constexpr int kThreads = 384;
static_assert(kWgmmaColBlock == kBN, "one wgmma covers the epilogue column block");

#if FP4G_WGMMA_DEVICE
FP4G_DEV void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
FP4G_DEV void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
FP4G_DEV void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
FP4G_DEV void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    do {
        asm volatile(
            "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            " selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}
FP4G_DEV void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// Shared-memory matrix descriptor: K-major tile of 128-byte rows, 128-byte swizzle.
FP4G_DEV uint64_t make_desc(uint32_t addr) {
    uint64_t d = static_cast<uint64_t>((addr & 0x3ffffu) >> 4);
    d |= static_cast<uint64_t>(1) << 16;             // leading byte offset: unused here
    d |= static_cast<uint64_t>(1024 >> 4) << 32;     // stride byte offset: 8 rows of 128 bytes
    d |= static_cast<uint64_t>(1) << 62;             // swizzle: 128 bytes
    return d;
}

#define FP4G_ACC64(d)                                                                              \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),        \
    "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),      \
    "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),      \
    "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),      \
    "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),      \
    "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),      \
    "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),      \
    "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

#define FP4G_REGS64                                                                                \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, "   \
    "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "    \
    "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "    \
    "%56, %57, %58, %59, %60, %61, %62, %63}"

// D (64 rows x 128 cols per warpgroup) = A * B^T (+ D when accumulate != 0).
template <int Kind> FP4G_DEV void wgmma_128(float (&d)[64], uint64_t da, uint64_t db, int accumulate);

template <> FP4G_DEV void wgmma_128<kElemE4M3>(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
        " wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " FP4G_REGS64 ", %64, %65, p, 1, 1;\n}\n"
        : FP4G_ACC64(d)
        : "l"(da), "l"(db), "r"(accumulate));
}
template <> FP4G_DEV void wgmma_128<kElemF16>(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
        " wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FP4G_REGS64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : FP4G_ACC64(d)
        : "l"(da), "l"(db), "r"(accumulate));
}
template <> FP4G_DEV void wgmma_128<kElemBF16>(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"
        " wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FP4G_REGS64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : FP4G_ACC64(d)
        : "l"(da), "l"(db), "r"(accumulate));
}

FP4G_DEV void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
FP4G_DEV void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
FP4G_DEV void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
#endif  // FP4G_WGMMA_DEVICE

template <int Kind>
__global__ void __launch_bounds__(kThreads, 1)
gemm_wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                  GemmArgs g) {
#if FP4G_WGMMA_DEVICE
    if (g.flags != nullptr && (((*g.flags & kFlagFp8) != 0) != (g.run_if_fp8 != 0))) return;
    constexpr bool kPromote = Kind == kElemE4M3;
    extern __shared__ uint8_t smem_raw[];
    __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages];
    const uint32_t smem0 = (smem_u32(smem_raw) + 1023u) & ~1023u;  // 128B swizzle atoms: 1024-aligned
    const int wg = threadIdx.x >> 7;
    const int KT = g.k_bytes / kBKB;
    const int ebytes = elem_bytes(Kind);
    const int64_t bm = static_cast<int64_t>(blockIdx.y) * kBM;
    const int bn = blockIdx.x * kBN;

    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbar_init(smem_u32(&full_bar[s]), 1);
            mbar_init(smem_u32(&empty_bar[s]), 8);  // one arrival per consumer warp
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // ---- producer ----
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            for (int kt = 0; kt < KT; ++kt) {
                const int s = kt % kStages;
                const uint32_t phase = (kt / kStages) & 1;
                mbar_wait(smem_u32(&empty_bar[s]), phase ^ 1);  // the first pass returns at once
                const uint32_t full = smem_u32(&full_bar[s]);
                mbar_expect_tx(full, kStageBytes);
                const uint32_t a_s = smem0 + s * kStageBytes;
                const int k_elem = kt * (kBKB / ebytes);
                tma_load_2d(a_s, &map_a, k_elem, static_cast<int>(bm), full);
                tma_load_2d(a_s + kTileBytes, &map_b, k_elem, bn, full);
            }
        }
    } else {
        // ---- consumers ----
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int c = wg - 1;                  // rows [64 c, 64 c + 64) of the tile
        const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
        float acc[64];
        float part[64];  // the current K block's wgmma accumulators (FP8 promotion)
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = part[i] = 0.0f;
        for (int kt = 0; kt < KT; ++kt) {
            const int s = kt % kStages;
            mbar_wait(smem_u32(&full_bar[s]), (kt / kStages) & 1);
            const uint32_t a_s = smem0 + s * kStageBytes + c * (64 * kBKB);
            const uint32_t b_s = smem0 + s * kStageBytes + kTileBytes;
            const uint64_t da = make_desc(a_s), db = make_desc(b_s);
            wgmma_fence();
#pragma unroll
            for (int k = 0; k < kBKB / 32; ++k) {
                if constexpr (kPromote) {
                    wgmma_128<Kind>(part, da + 2 * k, db + 2 * k, k > 0);
                } else {
                    wgmma_128<Kind>(acc, da + 2 * k, db + 2 * k, kt > 0 || k > 0);
                }
            }
            wgmma_commit();
            wgmma_wait0();
            if (lane == 0) mbar_arrive(smem_u32(&empty_bar[s]));
            if constexpr (kPromote) {
#pragma unroll
                for (int i = 0; i < 64; ++i) acc[i] += part[i];
            }
        }

        // ---- epilogue ----
        const GemmEpilogue& ep = g.epi;
        const int gq = lane >> 2, q = lane & 3;
        const int n0 = bn + 32 * q;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int64_t m = bm + 64 * c + 16 * warp + gq + 8 * h;
            if (m >= g.M) continue;
            const float sm = ep.row_scale != nullptr ? ep.row_scale[m] : 1.0f;
            const float zm = ep.row_zero != nullptr ? ep.row_zero[m] : 0.0f;
#pragma unroll
            for (int cc = 0; cc < 4; ++cc) {
                const int nb = n0 + 8 * cc;
                float v[8];
#pragma unroll
                for (int t = 0; t < 8; ++t) {
                    const int j = 4 * cc + (t >> 1), e = t & 1;
                    const float cr = ep.col_rowsum != nullptr ? ep.col_rowsum[nb + t] : 0.0f;
                    v[t] = sm * (acc[4 * j + 2 * h + e] * ep.col_scale[nb + t]) + (zm * cr + ep.col_bias[nb + t]);
                }
                const int64_t base = m * g.N + nb;
                if (ep.vec_ok && nb + 8 <= g.N) {
                    store_out8(ep.y, base, ep.dtype, v);
                } else {
#pragma unroll
                    for (int t = 0; t < 8; ++t)
                        if (nb + t < g.N) store_out(ep.y, base + t, ep.dtype, v[t]);
                }
            }
        }
    }
#else
    __trap();  // built without sm_90a: the dispatcher never selects this path then
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
    if (fn == nullptr) {
        void* p = nullptr;
        cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess)
            return nullptr;
#else
        if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q) != cudaSuccess)
            return nullptr;
#endif
        if (q != cudaDriverEntryPointSuccess) return nullptr;
        fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
    }
    return fn;
}

// 2-D row-major map over [rows, cols] elements (row stride in bytes), box = 128 rows x 128 bytes.
bool make_map(CUtensorMap* map, const void* base, int kind, int64_t rows, int64_t cols, int64_t stride_bytes) {
    PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (encode == nullptr) return false;
    const int ebytes = elem_bytes(kind);
    const CUtensorMapDataType type = kind == kElemE4M3 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                     : kind == kElemF16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                        : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
    const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride_bytes)};
    const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBKB / ebytes), static_cast<cuuint32_t>(kBM)};
    const cuuint32_t estr[2] = {1, 1};
    return encode(map, type, 2, const_cast<void*>(base), dims, strides, box, estr,
                  CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                  CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int Kind>
cudaError_t launch_kind(const GemmArgs& g, cudaStream_t stream) {
    static bool configured = false;
    if (!configured) {
        const cudaError_t e = cudaFuncSetAttribute(gemm_wgmma_kernel<Kind>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
        if (e != cudaSuccess) return e;
        configured = true;
    }
    const int ebytes = elem_bytes(Kind);
    CUtensorMap map_a, map_b;
    if (!make_map(&map_a, g.a, Kind, g.M, g.a_valid_bytes / ebytes, g.lda_bytes) ||
        !make_map(&map_b, g.b, Kind, g.N_pad, g.k_bytes / ebytes, g.ldb_bytes)) {
        return cudaErrorInvalidValue;
    }
    const int64_t mt = (g.M + kBM - 1) / kBM;
    if (mt > 65535) return cudaErrorInvalidValue;
    const dim3 grid(g.N_pad / kBN, static_cast<unsigned>(mt));
    gemm_wgmma_kernel<Kind><<<grid, kThreads, kSmemBytes, stream>>>(map_a, map_b, g);
    return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemm_wgmma(const GemmArgs& g, cudaStream_t stream) {
    if (g.M == 0) return cudaSuccess;
    switch (g.kind) {
        case kElemE4M3: return launch_kind<kElemE4M3>(g, stream);
        case kElemF16: return launch_kind<kElemF16>(g, stream);
        default: return launch_kind<kElemBF16>(g, stream);
    }
}

}  // namespace fp4g
