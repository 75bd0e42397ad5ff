"""FP4 GEMM CUDA kernels, the TensorRT plugin, and the loader that registers it.

    plugins/fp4_gemm/   kernels (C API fp4gemm.h), the FP4Gemm TensorRT plugin, numpy model
    plugins/loader.py   finds or builds the libraries; load_plugin() registers FP4Gemm with
                        tensorrt / tensorrt_rtx, load_kernels() gives ctypes bindings
    plugins/CMakeLists.txt   cmake -S plugins -B build/plugins [-DTENSORRT_ROOT=...]

Design, dispatch and what is verified: docs/plugin.md.
"""
