"""Small quantized models for the export tests, made by hand (formats, scales, LoRA set directly).

Until the model presets exist these stand in for `sdxl-tiny`: a diffusers UNet2DConditionModel with
SDXL's block types (text_time added embeddings, cross-attention down/up blocks, linear projections)
at tiny widths, every Linear/Conv2d swapped for a quantized layer.
"""
from __future__ import annotations

import torch
from torch import nn

from exporter.formats import get_format
from exporter.layers import quant_layers, set_quant_enabled, swap_quant_layers
from exporter.lora import LoRA, TALoRA, AdapterSelection

NUM_ADAPTERS = 3
NUM_TIMESTEPS = 1000


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, use_linear_projection=True).eval()


def adapter_table(num_timesteps: int = NUM_TIMESTEPS, k: int = NUM_ADAPTERS) -> torch.Tensor:
    """Frozen router choices: early, middle and late timesteps use different adapters."""
    return (torch.arange(num_timesteps) * k // num_timesteps).long()


_SIGNED = ("e2m1", "e1m2", "e3m0")
_UNSIGNED = ("ue3m1", "ue2m2", "ue1m3", "ue4m0")


def quantize_by_hand(model: nn.Module, calib_args: tuple, call=None, talora: bool = True,
                     include=None, exclude=r"^(conv_in|conv_out|time_embedding|add_embedding)",
                     seed: int = 0) -> list[str]:
    """W4A4 with formats, scales, zero points, mixed precision, LoRA and TALoRA set by hand.

    Layer i gets (deterministically) a signed or an unsigned (zero point) activation format,
    some layers per-token dynamic activations, some mixed-precision weights (3/4/5 bits), plain
    LoRA on some and TALoRA (shared selection, K adapters) on others. Scales come from one float
    forward on ``calib_args`` (absmax / max, or min and (max - min) / max for unsigned).
    """
    call = call or (lambda m, *a: m(*a))
    names = swap_quant_layers(model, include=include, exclude=exclude)
    layers = dict(quant_layers(model))
    stats: dict[str, tuple[float, float]] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float()
            lo, hi = stats.get(name, (float("inf"), float("-inf")))
            stats[name] = (min(lo, x.min().item()), max(hi, x.max().item()))
        return fn

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
    set_quant_enabled(model, False, False)
    with torch.no_grad():
        call(model, *calib_args)
    for h in handles:
        h.remove()
    set_quant_enabled(model, True, True)
    g = torch.Generator().manual_seed(seed)
    selection = AdapterSelection(NUM_ADAPTERS)
    for i, name in enumerate(names):
        layer = layers[name]
        lo, hi = stats[name]
        unsigned = lo > -0.3 * max(hi, 1e-6) or i % 5 == 1  # SiLU/GELU-like inputs, plus some
        a_fmt = _UNSIGNED[i % len(_UNSIGNED)] if unsigned else _SIGNED[i % len(_SIGNED)]
        layer.a_quant.set_format(a_fmt)
        layer.w_quant.set_format(_SIGNED[(i + 1) % len(_SIGNED)])
        fa = get_format(a_fmt)
        with torch.no_grad():
            if i % 7 == 3:
                layer.a_quant.mode = "dynamic"
            elif fa.signed:
                layer.a_quant.scale.fill_(max(abs(lo), abs(hi)) / fa.max)
            else:
                layer.a_quant.zero_point.fill_(lo)
                layer.a_quant.scale.fill_((hi - lo) / fa.max)
            if i % 4 == 2:
                bits = layer.w_quant.fmt.bits
                pattern = torch.tensor([bits - 1, bits, bits, bits + 1], dtype=torch.int8)
                layer.w_quant.bits.copy_(pattern.repeat(layer.weight.shape[0] // 4 + 1)[: layer.weight.shape[0]])
        out_f, in_f = layer.weight.shape[0], layer.fan_in
        if talora and i % 3 == 0:
            lora = TALoRA(in_f, out_f, 2, selection, scale=0.5)
        elif i % 3 == 1:
            lora = LoRA(in_f, out_f, 2, scale=0.5)
        else:
            lora = None
        if lora is not None:
            with torch.no_grad():
                lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.05)
            layer.add_lora(lora)
        with torch.no_grad():  # weight scales after LoRA: per output channel absmax / max
            w = layer.effective_weight().detach().reshape(out_f, -1)
            if isinstance(layer.lora, TALoRA):
                w = torch.stack([_adapter_weight(layer, k) for k in range(NUM_ADAPTERS)]).abs().amax(0)
            fw = layer.w_quant.fmt
            layer.w_quant.scale.copy_((w.abs().amax(1) / fw.max).clamp_min(1e-8))
    return names


def _adapter_weight(layer, k):
    sel = layer.lora.selection
    old = sel.index
    sel.select(k)
    w = layer.effective_weight().detach().reshape(layer.weight.shape[0], -1)
    sel.select(old)
    return w


def tiny_quant_unet(seed: int = 0, talora: bool = True):
    """(quantized tiny UNet, adapter table, example inputs dict)."""
    from exporter.export import unet_call, unet_example_inputs

    unet = tiny_unet(seed)
    inputs = unet_example_inputs(unet, batch=2, height=16, width=16, text_len=7, seed=seed)
    quantize_by_hand(unet, tuple(inputs.values()), call=unet_call, talora=talora, seed=seed)
    return unet, adapter_table(), inputs


class ConvLinearStack(nn.Module):
    """Conv2d -> SiLU -> Conv2d -> flatten tokens -> Linear -> GELU -> Linear (hand-made)."""

    def __init__(self, c: int = 8, d: int = 16, pooled: bool = False):
        super().__init__()
        self.pooled = pooled  # tokens averaged: the Linear layers get rank-2 [batch, c] inputs
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, stride=2)
        self.fc1 = nn.Linear(c, d)
        self.fc2 = nn.Linear(d, 5)

    def forward(self, x):
        h = self.conv2(torch.nn.functional.silu(self.conv1(x)))
        h = h.mean((2, 3)) if self.pooled else h.flatten(2).transpose(1, 2)
        return self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def make_nvfp4_activations(a_quant) -> None:
    """Switch an activation quantizer to NVFP4 blocks, the global scale keeping its range."""
    from exporter.quantizers import NVFP4_SCALE_MAX

    with torch.no_grad():
        old = a_quant.fmt.max
        a_quant.set_format("e2m1")
        a_quant.mode = "nvfp4"
        a_quant.scale.mul_(old / 6.0 / NVFP4_SCALE_MAX)


def nvfp4_ready_stack_export(path, fp16: bool = False, pooled: bool = False):
    """A hand-quantized :class:`ConvLinearStack` (signed and unsigned activations, mixed precision)
    with fc1 made NVFP4-eligible (4-bit e2m1 weights, NVFP4 block activations whose global scale
    keeps the calibrated range), exported to ``path`` (``fp16``: as float16; ``pooled``: rank-2
    Linear inputs): TensorRT builds its targets in seconds."""
    from exporter.export import export_onnx, to_fp16

    torch.manual_seed(0)
    model, x = ConvLinearStack(c=16, d=32, pooled=pooled), torch.randn(2, 3, 8, 8)
    quantize_by_hand(model, (x,), talora=False, exclude=None)
    fc1 = dict(quant_layers(model))["fc1"]
    with torch.no_grad():
        fc1.w_quant.bits.fill_(4)
        make_nvfp4_activations(fc1.a_quant)
    if fp16:
        to_fp16(model)
    export_onnx(model, {"x": x.half() if fp16 else x}, path, timestep_input=None)
    return path
