// Stand-ins for the kernel launchers: linked with fp4gemm_api.cpp into a library that has the
// whole C API but no device code, so the CPU tests can exercise the dispatcher (layer checks,
// plans, workspace sizes) in seconds. Any launch fails with cudaErrorNotSupported.
#include "fp4gemm_common.cuh"

namespace fp4g {

cudaError_t launch_prep(const LayerDesc&, const Operands&, const Workspace&, PrepArgs, cudaStream_t) {
    return cudaErrorNotSupported;
}
cudaError_t launch_quantize_rows(const LayerDesc&, const Operands&, const Workspace&, int, int64_t, cudaStream_t) {
    return cudaErrorNotSupported;
}
cudaError_t launch_gemm_mma(const GemmArgs&, cudaStream_t) { return cudaErrorNotSupported; }
cudaError_t launch_gemm_wgmma(const GemmArgs&, cudaStream_t) { return cudaErrorNotSupported; }
cudaError_t launch_simt(const LayerDesc&, const Operands&, const Workspace&, cudaStream_t) {
    return cudaErrorNotSupported;
}
cudaError_t launch_smallm(const LayerDesc&, const Operands&, const SmallMArgs&, const Workspace&, int, int32_t*,
                          cudaStream_t) {
    return cudaErrorNotSupported;
}

}  // namespace fp4g
