"""Quantized layers and the helper that swaps them into any nn.Module.

y = Q_a(x) * Q_w(W + s * B A)^T (+ bias): the LoRA delta joins the float
weight before weight quantization, so the deployed weight is one quantized
tensor (graph_passes/fold_lora does the same on the ONNX side).

Optional MPQ-DM smoothing (``smooth``, one factor per input channel, absent by
default): y = Q_a(x / smooth) * Q_w((W + s * B A) * smooth)^T (+ bias), which
equals x W^T before quantization and moves outliers between activations and
weights. Both products are computed in float32 (true division for x, so an
exporter reproduces the codes exactly).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRA, TALoRA
from .quantizers import ActQuantizer, WeightQuantizer


class _QuantLayer(nn.Module):
    """Shared state of QuantLinear / QuantConv2d: weight, bias, quantizers, LoRA slot."""

    channel_axis = -1
    #: the original float weight while GPTQ has replaced ``weight`` (exporter.gptq.gptq_layer);
    #: the fine-tuning teacher (exporter.finetune.float_model) runs on it. Never saved.
    float_weight: torch.Tensor | None = None

    def __init__(self, layer: nn.Module, w_fmt: str, a_fmt: str, a_mode: str):
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias
        self.w_quant = WeightQuantizer(self.weight.shape[0], w_fmt)
        self.a_quant = ActQuantizer(a_fmt, a_mode, channel_axis=self.channel_axis)
        self.lora: LoRA | TALoRA | None = None
        # [in_channels] float32 or None; set by mixed-precision calibration (exporter.mixed_precision)
        self.register_buffer("smooth", None)

    @property
    def fan_in(self) -> int:
        return self.weight[0].numel()

    def add_lora(self, lora: LoRA | TALoRA) -> None:
        """Attach a LoRA whose A is [.., rank, fan_in] and B [.., out_channels, rank]."""
        if lora.A.shape[-1] != self.fan_in or lora.B.shape[-2] != self.weight.shape[0]:
            raise ValueError(
                f"LoRA shapes A{tuple(lora.A.shape)} B{tuple(lora.B.shape)} do not fit a weight "
                f"of {self.weight.shape[0]} outputs x {self.fan_in} inputs"
            )
        self.lora = lora

    def effective_weight(self) -> torch.Tensor:
        """W + s * B A, in the weight's shape and dtype (float, before quantization). The sum is
        computed in float32 and rounded once: in a 16-bit model every runtime then gets the same
        weight (ONNX Runtime computes fp16 ops in fp32 and rounds only at the end, so a sum of
        two fp16-rounded terms flipped weight codes; exporter.export.to_fp16 keeps A and B fp32)."""
        if self.lora is None:
            return self.weight
        return (self.weight.float() + self.lora.delta().float().view_as(self.weight)).to(self.weight.dtype)

    def _smooth_view(self, ndim: int, axis: int) -> torch.Tensor:
        shape = [1] * ndim
        shape[axis] = -1
        return self.smooth.view(shape)

    def smooth_input(self, x: torch.Tensor) -> torch.Tensor:
        """x / smooth along the channel axis (identity without smoothing)."""
        if self.smooth is None:
            return x
        return (x.float() / self._smooth_view(x.dim(), self.channel_axis)).to(x.dtype)

    def quantized_weight(self) -> torch.Tensor:
        w = self.effective_weight()
        if self.smooth is not None:  # input channels are axis 1 of Linear and Conv2d weights
            w = (w.float() * self._smooth_view(w.dim(), 1)).to(w.dtype)
        return self.w_quant(w)


class QuantLinear(_QuantLayer):
    """nn.Linear with fake-quantized input activations and weights."""

    channel_axis = -1

    def __init__(self, layer: nn.Linear, w_fmt: str = "e2m1", a_fmt: str = "e2m1",
                 a_mode: str = "static"):
        super().__init__(layer, w_fmt, a_fmt, a_mode)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(self.smooth_input(x)), self.quantized_weight(), self.bias)


class QuantConv2d(_QuantLayer):
    """nn.Conv2d with fake-quantized input activations and weights."""

    channel_axis = 1

    def __init__(self, layer: nn.Conv2d, w_fmt: str = "e2m1", a_fmt: str = "e2m1",
                 a_mode: str = "static"):
        if layer.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {layer.padding_mode!r}")
        super().__init__(layer, w_fmt, a_fmt, a_mode)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation, self.groups = layer.padding, layer.dilation, layer.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.a_quant(self.smooth_input(x)), self.quantized_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)


QUANT_LAYERS = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d}


def _name_filter(include: str | Callable[[str], bool] | None,
                 exclude: str | Callable[[str], bool] | None) -> Callable[[str], bool]:
    def as_pred(p, default):
        if p is None:
            return lambda name: default
        if callable(p):
            return p
        rx = re.compile(p)
        return lambda name: rx.search(name) is not None

    inc, exc = as_pred(include, True), as_pred(exclude, False)
    return lambda name: inc(name) and not exc(name)


def swap_quant_layers(model: nn.Module, include=None, exclude=None,
                      factory: Callable[[str, nn.Module], nn.Module] | None = None) -> list[str]:
    """Replace every nn.Linear / nn.Conv2d whose qualified name passes the filter, in place.

    ``include``/``exclude``: regex (searched in the module name) or predicate.
    ``factory(name, layer)`` builds the replacement (default: QuantLinear /
    QuantConv2d with e2m1 weights and activations). Returns the swapped names.
    """
    keep = _name_filter(include, exclude)
    make = factory or (lambda name, layer: QUANT_LAYERS[type(layer)](layer))
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) in QUANT_LAYERS and n and keep(n)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, layer))
    return [n for n, _ in targets]


def quant_layers(model: nn.Module) -> Iterable[tuple[str, _QuantLayer]]:
    """(name, layer) for every quantized layer, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, _QuantLayer))


def set_quant_enabled(model: nn.Module, weights: bool = True, activations: bool = True) -> None:
    """Turn weight / activation quantization on or off in every quantized layer."""
    for _, layer in quant_layers(model):
        layer.w_quant.enabled = weights
        layer.a_quant.enabled = activations
