"""ONNX graph passes: fold LoRA, quantize and pack weights, fuse FP4 GEMMs, emit targets."""
