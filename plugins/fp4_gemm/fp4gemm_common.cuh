// Internal declarations shared by the FP4Gemm kernels and their launchers.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fp4gemm.h"
#include "fp4gemm_numerics.cuh"

namespace fp4g {

constexpr int kMaxGroups = FP4GEMM_MAX_GROUPS;
constexpr int kKPad = 128;     // K is padded (with zeros) to a multiple of this in the workspace
constexpr int kTileN = 128;    // N is padded to a multiple of the GEMM tile width
constexpr int kMmaColBlock = 32;     // epilogue column block of the mma.sync GEMM (warp tile N)
constexpr int kWgmmaColBlock = 128;  // ... of the wgmma GEMM (instruction N)

// Flags word of the MMA/WGMMA paths (fp4gemm_flags_address).
constexpr int kFlagFp8 = 1;           // the weight tables fit E4M3: the FP8 GEMM runs
constexpr int kFlagInexact16 = 2;     // a table value is not exact in the 16-bit operand type
constexpr int kFlagBadAdapter = 4;    // adapter index out of range: output is NaN
constexpr int kFlagBadPerm = 8;       // perm entry out of range: that row is dropped

// Operand element kinds on the tensor cores.
enum ElemKind : int { kElemE4M3 = 0, kElemF16 = 1, kElemBF16 = 2 };

FP4G_HD int elem_bytes(int kind) { return kind == kElemE4M3 ? 1 : 2; }
FP4G_HD int dtype_bytes(int dtype) { return dtype == FP4GEMM_F32 ? 4 : 2; }
FP4G_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The layer, as the kernels see it (passed by value as a kernel parameter).
struct LayerDesc {
    int32_t K, N, G;
    int32_t bits[kMaxGroups];
    int32_t rows[kMaxGroups];       // rows per group
    int32_t row0[kMaxGroups];       // first grouped row of each group
    int32_t row_bytes[kMaxGroups];  // packed bytes per row
    int64_t byte0[kMaxGroups];      // first byte of each group inside one adapter
    int64_t adapter_bytes;          // B
    int32_t num_adapters;
    int32_t act_quant;              // a_ebits > 0
    int32_t dynamic;                // per-token scales
    ActFormat act;
    int32_t act_shift;              // activation grid -> E4M3 shift, kNoShift if none
};

FP4G_HD int group_of_row(const LayerDesc& L, int j) {
    int g = 0;
    while (g + 1 < L.G && j >= L.row0[g + 1]) ++g;
    return g;
}

// Device pointers of one call.
struct Operands {
    const void* x;
    const uint8_t* w;
    const float* w_scale;
    const float* w_lut;
    const float* a_scale;
    const float* a_zero;
    const float* bias;
    const int32_t* perm;
    const void* adapter;
    int32_t adapter_is_int32;
    int32_t dtype;
    void* y;
    int64_t M;
};

// Workspace pieces (byte offsets; computed on the host by fp4gemm_api.cpp).
struct Workspace {
    int32_t* flags;      // [4]
    float* row_scale;    // [max_m]   s_m (times 2^-act_shift on the FP8 path)
    float* row_zero;     // [max_m]   z_m
    float* col_scale;    // [N_pad]   w_scale (times 2^-shift_g on the FP8 path), output order
    float* col_bias;     // [N_pad]
    float* col_rowsum;   // [N_pad]   w_scale * sum_k L[j, k]
    uint8_t* a;          // [max_m, K_pad] operand elements
    uint8_t* b;          // [N_pad, K_pad] operand elements (decoded weights)
    float* partials;     // SMALLM split-K partial sums
};

#ifdef __CUDACC__
#define FP4G_DEV __device__ __forceinline__

FP4G_DEV int64_t read_adapter(const Operands& op) {
    return op.adapter_is_int32 ? static_cast<int64_t>(*static_cast<const int32_t*>(op.adapter))
                               : *static_cast<const int64_t*>(op.adapter);
}

template <typename T> FP4G_DEV float to_float(T v);
template <> FP4G_DEV float to_float<float>(float v) { return v; }
template <> FP4G_DEV float to_float<__half>(__half v) { return __half2float(v); }
template <> FP4G_DEV float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Store one output value in the problem's dtype (round to nearest even).
FP4G_DEV void store_out(void* y, int64_t idx, int dtype, float v) {
    if (dtype == FP4GEMM_F32) {
        static_cast<float*>(y)[idx] = v;
    } else if (dtype == FP4GEMM_F16) {
        static_cast<__half*>(y)[idx] = __float2half_rn(v);
    } else {
        static_cast<__nv_bfloat16*>(y)[idx] = __float2bfloat16_rn(v);
    }
}

// Store 8 consecutive output values (16-byte aligned for 16-bit outputs, 32 for fp32).
FP4G_DEV void store_out8(void* y, int64_t idx, int dtype, const float (&v)[8]) {
    if (dtype == FP4GEMM_F32) {
        float4* p = reinterpret_cast<float4*>(static_cast<float*>(y) + idx);
        p[0] = make_float4(v[0], v[1], v[2], v[3]);
        p[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        uint32_t w[4];
        for (int i = 0; i < 4; ++i) {
            if (dtype == FP4GEMM_F16) {
                __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
                w[i] = *reinterpret_cast<uint32_t*>(&h);
            } else {
                __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
                w[i] = *reinterpret_cast<uint32_t*>(&h);
            }
        }
        *reinterpret_cast<uint4*>(static_cast<uint16_t*>(y) + idx) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

FP4G_DEV float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
FP4G_DEV float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
FP4G_DEV float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- PTX wrappers ----------------------------------------------------------------------------
FP4G_DEV uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies 16 bytes global -> shared; only the first src_bytes (0..16) are read, the rest of the
// destination is zero-filled. src must be 16-byte aligned.
FP4G_DEV void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
FP4G_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> FP4G_DEV void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

FP4G_DEV void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D = A * B + D, one m16n8 tile, fp32 accumulators. The operand registers have the same layout
// for every kind (32-bit words: f16/bf16 k16 and e4m3 k32 both span 32 bytes of K).
template <int Kind> FP4G_DEV void mma_16x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <> FP4G_DEV void mma_16x8<kElemF16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <> FP4G_DEV void mma_16x8<kElemBF16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <> FP4G_DEV void mma_16x8<kElemE4M3>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // never launched below sm_89 (the dispatcher checks)
#endif
}

// Two fp32 values -> packed E4M3x2 (low byte = lo). The values are exact in E4M3.
FP4G_DEV uint32_t pack_e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint16_t r;
    asm("{\n .reg .b16 t;\n cvt.rn.satfinite.e4m3x2.f32 t, %2, %1;\n mov.b16 %0, t;\n}\n"
        : "=h"(r)
        : "f"(lo), "f"(hi));
    return r;
#else
    return static_cast<uint32_t>(e4m3_bits_of_exact(lo)) |
           (static_cast<uint32_t>(e4m3_bits_of_exact(hi)) << 8);
#endif
}
#endif  // __CUDACC__

// ---- launchers (one per kernel file; all asynchronous, return cudaGetLastError()) -------------
struct GemmEpilogue {
    const float* row_scale;   // nullptr: 1
    const float* row_zero;    // nullptr: 0
    const float* col_scale;
    const float* col_bias;
    const float* col_rowsum;  // nullptr: no zero-point term
    void* y;
    int32_t dtype;
    int32_t vec_ok;           // Y rows allow 16-byte stores of 8 outputs
};

struct GemmArgs {
    const uint8_t* a;     // [M, lda] elements, K-major
    const uint8_t* b;     // [N_pad, ldb] elements, K-major, rows in epilogue order
    int64_t lda_bytes, ldb_bytes;
    int64_t a_valid_bytes; // bytes of each A row that hold data (the rest reads as zero)
    int64_t M;
    int32_t N, N_pad;
    int32_t k_bytes;      // padded K in bytes (multiple of 128)
    int32_t kind;         // ElemKind
    const int32_t* flags; // run only when ((*flags & kFlagFp8) != 0) == run_if_fp8
    int32_t run_if_fp8;
    GemmEpilogue epi;
};

// The prep pass (fp4gemm_prep.cu): weight decode and/or activation quantization in one launch.
struct PrepArgs {
    int32_t decode;         // run the decode job (MMA/WGMMA paths)
    int32_t kind16;         // 16-bit operand kind of the decoded weights when not FP8
    int32_t col_block;      // epilogue column block of the GEMM that follows
    int32_t allow_fp8;      // E4M3 operands if the tables fit (the plan's fp8)
    int32_t qmode;          // QuantMode, or kQuantNone
    int64_t lda;            // elements per row of the quantized activations
    int32_t decode_blocks;  // set by launch_prep
    int32_t vec;            // set by launch_prep
};
cudaError_t launch_prep(const LayerDesc& L, const Operands& op, const Workspace& ws, PrepArgs args,
                        cudaStream_t stream);
cudaError_t launch_quantize_rows(const LayerDesc& L, const Operands& op, const Workspace& ws,
                                 int mode, int64_t lda, cudaStream_t stream);
cudaError_t launch_gemm_mma(const GemmArgs& g, cudaStream_t stream);
cudaError_t launch_gemm_wgmma(const GemmArgs& g, cudaStream_t stream);
cudaError_t launch_simt(const LayerDesc& L, const Operands& op, const Workspace& ws,
                        cudaStream_t stream);
// SMALLM operand A: X itself (W4A16) or quantize_rows' fp16 grid values (W4A4).
struct SmallMArgs {
    const void* a;            // [M, lda] elements of `kind`
    int64_t lda;
    int32_t kind;             // kElemF16 or kElemBF16
    int32_t vec;              // rows allow 16-byte loads
    const float* row_scale;   // nullptr: 1 (W4A16)
    const float* row_zero;
};
cudaError_t launch_smallm(const LayerDesc& L, const Operands& op, const SmallMArgs& sa,
                          const Workspace& ws, int split_k, int32_t* semaphores, cudaStream_t stream);

// quantize_rows modes
enum QuantMode : int {
    kQuantStats = 0,      // only row_scale / row_zero
    kQuantE4M3 = 1,       // grid values as E4M3 (times 2^act_shift), K padded
    kQuantF16 = 2,        // grid values as fp16, K padded
    kQuantCopy = 3,       // W4A16: X copied (fp16/bf16 kept), K padded with zeros
    kQuantAuto = 4,       // E4M3 if the decode tables fit E4M3 (the plan allowing it), else fp16
    kQuantNone = -1       // no quantize job
};

}  // namespace fp4g
