"""Shared, cached sdxl-tiny runs for the quantization tests (one per test process)."""
from __future__ import annotations

import copy
import functools
import warnings

import torch

# Small models: one thread is faster and, under pytest -n 2, avoids oversubscribing the cores.
torch.set_num_threads(1)

#: a calibration small enough for tests, big enough that every layer gets rows
TEST_CALIB = dict(calib_samples=4, calib_steps=3, resolution=128, max_tokens=256, seed=0)


@functools.lru_cache(maxsize=None)
def _tiny_fp():
    from exporter.models import get_preset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_preset("sdxl-tiny").build(seed=0)


def tiny_fp():
    """A fresh copy of the seeded-random FP sdxl-tiny UNet."""
    return copy.deepcopy(_tiny_fp())


@functools.lru_cache(maxsize=None)
def _tiny_quantized(finetune_steps: int, scheme: str):
    from exporter.quantize import quantize_model

    return quantize_model("sdxl-tiny", model=tiny_fp(), scheme=scheme, finetune_steps=finetune_steps,
                          **TEST_CALIB)


def tiny_quantized(finetune_steps: int = 0, scheme: str = "w4a4"):
    """(model, report) of a W4A4 sdxl-tiny quantization (a fresh copy of a cached run)."""
    model, report = _tiny_quantized(finetune_steps, scheme)
    ctrl = getattr(model, "talora", None)
    if ctrl is None:
        return copy.deepcopy(model), copy.deepcopy(report)
    ctrl.detach()  # hooks are bound to the original controller: copy without them
    try:
        copied = copy.deepcopy(model)
    finally:
        ctrl.attach(model)
    copied.talora.attach(copied)
    return copied, copy.deepcopy(report)
