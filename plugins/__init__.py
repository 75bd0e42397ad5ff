"""FP4 GEMM CUDA kernels, the TensorRT plugin, and the loader that registers it."""
