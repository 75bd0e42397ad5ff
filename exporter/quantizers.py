"""Weight and activation fake quantizers (PyTorch modules).

Both quantize ``x -> z + s * Q_fmt((x - z) / s)`` where ``Q_fmt`` rounds to
the format's grid (:mod:`exporter.formats`) with a straight-through gradient.
``s`` and ``z`` are ``nn.Parameter`` so calibration can set them and
fine-tuning can train them. ``z`` is used only with unsigned formats
(MSFP's unsigned FP4 with a zero point); for signed formats it stays 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import Format, get_format, with_bits

#: smallest scale a dynamic quantizer uses, so an all-zero token stays finite
DYNAMIC_EPS = 1e-8
ACT_MODES = ("static", "dynamic", "nvfp4")
#: NVFP4 activations: e2m1 values in blocks of this many along the feature axis, each block's
#: scale an FP8 E4M3 value (at most this) times the per-tensor global scale
NVFP4_BLOCK, NVFP4_SCALE_MAX = 16, 448.0


def _round_e4m3(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float8_e4m3fn).float()


def nvfp4_block_scale(x: torch.Tensor, global_scale: torch.Tensor, round_e4m3=_round_e4m3) -> torch.Tensor:
    """Each element's NVFP4 block scale, shaped like x (float32): per block of 16 along the last
    axis ``s = fp8_e4m3(min(amax / 6 / g, 448)) * g``, TensorRT's dynamic FP4 quantizer
    (``trt::TRT_FP4DynamicQuantize``, which Blackwell's FP4 GEMMs take their activations from). An
    all-zero block gets 1 instead of 0, so its codes are 0 without a 0 / 0 (same values).

    The block max is a max-pool and the broadcast back a nearest upsampling: in ONNX neither
    reads a shape, so the scale is a function of x alone (graph_passes.native_fp4 checks that by
    running it). ``round_e4m3``: the export passes our e4m3 QuantizeFP/DequantizeFP (TensorRT
    takes no Cast to FP8); on [0, 448] both round half to even to the same grid."""
    a = x.float().abs()
    if a.dim() not in (2, 3):
        raise ValueError(f"nvfp4 activations need a [tokens, K] or [batch, tokens, K] input, got {tuple(x.shape)}")
    a3 = a if a.dim() == 3 else a.unsqueeze(0)
    amax = F.max_pool1d(a3, NVFP4_BLOCK, NVFP4_BLOCK)
    g = global_scale.float()
    s = round_e4m3((amax / 6.0 / g).clamp(max=NVFP4_SCALE_MAX)) * g
    s = torch.where(s > 0, s, torch.ones_like(s))
    s = F.interpolate(s, scale_factor=NVFP4_BLOCK, mode="nearest")
    return s if a.dim() == 3 else s.squeeze(0)


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
    ``mode="nvfp4"`` (signed e2m1, Linear layers, features a multiple of 16):
    Blackwell's NVFP4 activations, ``scale`` is the calibrated global scale g and
    each block of 16 features gets :func:`nvfp4_block_scale` at run time.
    ``channel_axis`` is the feature axis (-1 for Linear, 1 for Conv2d); a
    "token" is every other index.
    """

    def __init__(self, fmt: str = "e2m1", mode: str = "static", channel_axis: int = -1):
        super().__init__()
        if mode not in ACT_MODES:
            raise ValueError(f"activation mode must be one of {ACT_MODES}, got {mode!r}")
        if mode == "nvfp4" and (fmt != "e2m1" or channel_axis != -1):
            raise ValueError(f"nvfp4 activations are e2m1 along the last axis, got {fmt} on axis {channel_axis}")
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
        elif self.mode == "nvfp4":
            scale, zp = nvfp4_block_scale(x, self.scale), None
        else:
            scale, zp = self.scale, (None if self.fmt.signed else self.zero_point)
        return fake_quantize(x, self.fmt, scale, zp)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt.name}, mode={self.mode}"
