// SIMT path: the contract's formula evaluated literally in fp32 on CUDA cores.
//   Xq = z + s * decode(encode((X - z) / s))   (true IEEE division)
//   Wq = w_lut[group, code] * w_scale
//   Y[:, perm[j]] = Xq @ Wq[j]^T + bias[j]
// Slow but exact for any input: fp32 W4A16 layers, formats that fit neither E4M3 nor fp16, and
// a second opinion in the GPU tests. Dynamic per-token scales come from quantize_rows (stats).
#include "fp4gemm_common.cuh"

namespace fp4g {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16;

template <typename T>
__global__ void __launch_bounds__(256)
simt_kernel(LayerDesc L, Operands op, Workspace ws) {
    __shared__ float As[kBK][kBM + 1];
    __shared__ float Ws[kBK][kBN + 1];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // 16 x 16 threads, 4 x 4 outputs each
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
    const int n0 = blockIdx.x * kBN;  // grouped rows n0 .. n0 + 63

    int64_t adapter = read_adapter(op);
    const bool adapter_ok = adapter >= 0 && adapter < L.num_adapters;
    if (!adapter_ok) adapter = 0;

    float s_static = 1.0f, z_static = 0.0f;
    if (L.act_quant && !L.dynamic) {
        s_static = *op.a_scale;
        z_static = L.act.is_signed ? 0.0f : *op.a_zero;
    }

    float acc[4][4] = {};
    const T* x = static_cast<const T*>(op.x);
    for (int k0 = 0; k0 < L.K; k0 += kBK) {
        // activations: 64 rows x 16 k, 4 per thread
        for (int i = threadIdx.x; i < kBM * kBK; i += 256) {
            const int r = i / kBK, kk = i % kBK;
            const int64_t m = m0 + r;
            const int k = k0 + kk;
            float v = 0.0f;
            if (m < op.M && k < L.K) {
                v = to_float<T>(x[m * L.K + k]);
                if (L.act_quant) {
                    const float s = L.dynamic ? ws.row_scale[m] : s_static;
                    const float z = L.dynamic ? ws.row_zero[m] : z_static;
                    const float u = __fdiv_rn(L.act.is_signed ? v : __fsub_rn(v, z), s);
                    v = __fadd_rn(z, __fmul_rn(s, quantize(u, L.act)));
                }
            }
            As[kk][r] = v;
        }
        // weights: 64 grouped rows x 16 k, decoded and scaled
        for (int i = threadIdx.x; i < kBN * kBK; i += 256) {
            const int r = i / kBK, kk = i % kBK;
            const int j = n0 + r;
            const int k = k0 + kk;
            float v = 0.0f;
            if (j < L.N && k < L.K) {
                const int g = group_of_row(L, j);
                const int bits = L.bits[g], rb = L.row_bytes[g];
                const uint8_t* row = op.w + adapter * L.adapter_bytes + L.byte0[g] +
                                     static_cast<int64_t>(j - L.row0[g]) * rb;
                const int pos = k * bits;
                const int byte = pos >> 3;
                uint32_t pair = row[byte];
                if (byte + 1 < rb) pair |= static_cast<uint32_t>(row[byte + 1]) << 8;
                const uint32_t code = (pair >> (pos & 7)) & ((1u << bits) - 1u);
                v = __fmul_rn(op.w_lut[g * 256 + code], op.w_scale[j]);
            }
            Ws[kk][r] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBK; ++kk) {
            float a[4], w[4];
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
            for (int j = 0; j < 4; ++j) w[j] = Ws[kk][tx * 4 + j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
        }
        __syncthreads();
    }
    const float bad = adapter_ok ? 0.0f : __int_as_float(0x7fc00000);
    for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + ty * 4 + i;
        if (m >= op.M) continue;
        for (int jj = 0; jj < 4; ++jj) {
            const int j = n0 + tx * 4 + jj;
            if (j >= L.N) continue;
            const int n = op.perm[j];
            if (n < 0 || n >= L.N) continue;
            store_out(op.y, m * L.N + n, op.dtype, acc[i][jj] + op.bias[j] + bad);
        }
    }
}

}  // namespace

cudaError_t launch_simt(const LayerDesc& L, const Operands& op, const Workspace& ws,
                        cudaStream_t stream) {
    if (op.M == 0) return cudaSuccess;
    const int64_t mt = (op.M + kBM - 1) / kBM;
    if (mt > 65535) return cudaErrorInvalidValue;
    const dim3 grid((L.N + kBN - 1) / kBN, static_cast<unsigned>(mt));
    switch (op.dtype) {
        case FP4GEMM_F32: simt_kernel<float><<<grid, 256, 0, stream>>>(L, op, ws); break;
        case FP4GEMM_F16: simt_kernel<__half><<<grid, 256, 0, stream>>>(L, op, ws); break;
        default: simt_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(L, op, ws); break;
    }
    return cudaGetLastError();
}

}  // namespace fp4g
