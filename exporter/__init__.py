"""export-engine, PyTorch side: number formats, quantizers, models, calibration, ONNX export."""
__version__ = "0.1.0"
