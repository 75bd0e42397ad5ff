"""FP4Gemm: CUDA kernels (C API in fp4gemm.h), the TensorRT plugin, and the numpy model of both."""
