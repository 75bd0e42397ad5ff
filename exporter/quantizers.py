"""Weight and activation fake quantizers (PyTorch modules).

Both quantize ``x -> z + s * Q_fmt((x - z) / s)`` where ``Q_fmt`` rounds to
the format's grid (:mod:`exporter.formats`) with a straight-through gradient.
``s`` and ``z`` are ``nn.Parameter`` so calibration can set them and
fine-tuning can train them. ``z`` is used only with unsigned formats
(MSFP's unsigned FP4 with a zero point); for signed formats it stays 0.
"""
from __future__ import annotations

import torch
from torch import nn

from .formats import Format, get_format, with_bits

#: smallest scale a dynamic quantizer uses, so an all-zero token stays finite
DYNAMIC_EPS = 1e-8
ACT_MODES = ("static", "dynamic")


def fake_quantize(x: torch.Tensor, fmt: Format, scale, zero_point=None) -> torch.Tensor:
    """z + s * Q_fmt((x - z) / s), computed in float32, returned in x's dtype.

    ``scale``/``zero_point`` broadcast against ``x``. This is the single
    definition the ONNX QuantizeFP -> DequantizeFP pair reproduces.
    """
    xf = x.float()
    if zero_point is not None and not fmt.signed:
        u = (xf - zero_point) / scale
        y = zero_point + scale * fmt.quantize_torch(u)
    else:
        y = scale * fmt.quantize_torch(xf / scale)
    return y.to(x.dtype)


class WeightQuantizer(nn.Module):
    """Per-output-channel quantizer with an optional per-channel bit width.

    ``scale``: [C] float; ``bits``: [C] int8 buffer, all equal to the format's
    width unless mixed precision assigned N-1 / N+1 bits to some channels
    (those use :func:`exporter.formats.with_bits` of the layer's format).
    Input: weight [C, ...] (axis 0 = output channels).
    """

    def __init__(self, out_channels: int, fmt: str = "e2m1"):
        super().__init__()
        self.fmt = get_format(fmt)
        self.scale = nn.Parameter(torch.ones(out_channels))
        self.register_buffer("bits", torch.full((out_channels,), self.fmt.bits, dtype=torch.int8))
        self.enabled = True

    def set_format(self, fmt: str) -> None:
        self.fmt = get_format(fmt)
        self.bits.fill_(self.fmt.bits)

    @property
    def mixed(self) -> bool:
        return bool((self.bits != self.fmt.bits).any())

    def channel_formats(self) -> dict[int, Format]:
        """bits -> format, for the widths present."""
        return {int(b): with_bits(self.fmt, int(b)) for b in torch.unique(self.bits).tolist()}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        shape = (-1,) + (1,) * (w.dim() - 1)
        scale = self.scale.view(shape)
        if not self.mixed:
            return fake_quantize(w, self.fmt, scale)
        out = torch.empty_like(w)
        for bits, fmt in self.channel_formats().items():
            rows = (self.bits == bits).nonzero().squeeze(1)
            out = out.index_copy(0, rows, fake_quantize(w[rows], fmt, scale[rows]))
        return out

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.name}, channels={self.scale.numel()}, mixed={self.mixed}"


class ActQuantizer(nn.Module):
    """Input-activation quantizer.

    ``mode="static"``: one calibrated per-tensor ``scale`` (and ``zero_point``
    for unsigned formats). ``mode="dynamic"``: FP4DiT's per-token mode, each
    token's scale from its own range at run time (signed: absmax / max;
    unsigned: zero point = token min, scale = (max - min) / max).
    ``channel_axis`` is the feature axis (-1 for Linear, 1 for Conv2d); a
    "token" is every other index.
    """

    def __init__(self, fmt: str = "e2m1", mode: str = "static", channel_axis: int = -1):
        super().__init__()
        if mode not in ACT_MODES:
            raise ValueError(f"activation mode must be one of {ACT_MODES}, got {mode!r}")
        self.fmt = get_format(fmt)
        self.mode = mode
        self.channel_axis = channel_axis
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.zero_point = nn.Parameter(torch.tensor(0.0))
        self.enabled = True

    def set_format(self, fmt: str) -> None:
        self.fmt = get_format(fmt)
        if self.fmt.signed:
            with torch.no_grad():
                self.zero_point.zero_()

    def dynamic_params(self, x: torch.Tensor):
        """Per-token (scale, zero_point or None), shaped to broadcast against x."""
        xf = x.float()
        if self.fmt.signed:
            amax = xf.abs().amax(dim=self.channel_axis, keepdim=True)
            return (amax / self.fmt.max).clamp_min(DYNAMIC_EPS), None
        lo = xf.amin(dim=self.channel_axis, keepdim=True)
        hi = xf.amax(dim=self.channel_axis, keepdim=True)
        return ((hi - lo) / self.fmt.max).clamp_min(DYNAMIC_EPS), lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.mode == "dynamic":
            scale, zp = self.dynamic_params(x)
        else:
            scale, zp = self.scale, (None if self.fmt.signed else self.zero_point)
        return fake_quantize(x, self.fmt, scale, zp)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.name}, mode={self.mode}"
