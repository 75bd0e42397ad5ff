"""ONNX export of models with quantized layers (QuantLinear / QuantConv2d), exact and deterministic.

Route: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). Each quantizer call
becomes a ``torch.library`` custom op (``export_engine::quantize_fp`` ...) whose translation emits
our ``QuantizeFP`` / ``DequantizeFP`` nodes; everything else in the layer (the LoRA delta, the
weight view, F.linear / F.conv2d) is traced as ordinary torch code. The function bodies of
:mod:`exporter.onnx_ops` are attached to the model afterwards. docs/export.md shows the graph.

Graph of one quantized layer::

    x -> QuantizeFP -> DequantizeFP -------------------------------\
    W (+ MatMul(B, A) * s | Gather(B, k) @ Gather(A, k) * s) -> QuantizeFP -> DequantizeFP -> Gemm/MatMul/Conv

with ``k = Gather(adapter_table, timestep)`` for TALoRA.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import onnx
import torch
from torch import nn

from . import onnx_ops
from .formats import Format, get_format, with_bits
from .layers import QuantConv2d, QuantLinear, quant_layers
from .lora import TALoRA
from .quantizers import ActQuantizer, WeightQuantizer, nvfp4_block_scale

#: a protobuf holds at most 2 GiB; above this the weights go to one external data file
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
SUPPORTED_LAYERS = (QuantLinear, QuantConv2d)
#: model metadata of a (non-debug) export: JSON [[layer, its output value's name], ...], in graph
#: order, read by :func:`add_debug_outputs`
LAYER_OUTPUTS_KEY = "export_engine.layer_outputs"
#: the grid of the NVFP4 block scales (exporter.quantizers.nvfp4_block_scale)
E4M3 = get_format("e4m3")


class ExportError(ValueError):
    """The model or the options cannot be exported; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Custom ops: eager kernels (exporter.formats), fake kernels for tracing, ONNX translations
# ---------------------------------------------------------------------------------------------
def _fmt(signed: int, ebits: int, mbits: int) -> Format:
    return get_format(f"{'' if signed else 'u'}e{ebits}m{mbits}")


def _encode_channels(u: torch.Tensor, fmt: Format, channel_bits: list[int]) -> torch.Tensor:
    """Codes of u (float32), per channel along axis 0 when ``channel_bits`` has one entry each."""
    if len(channel_bits) == 1:
        return with_bits(fmt, channel_bits[0]).encode_torch(u)
    bits = torch.tensor(channel_bits)
    codes = torch.empty(u.shape, dtype=torch.uint8)
    for b in sorted(set(channel_bits)):
        rows = (bits == b).nonzero().squeeze(1)
        codes[rows] = with_bits(fmt, b).encode_torch(u[rows])
    return codes


@torch.library.custom_op("export_engine::quantize_fp", mutates_args=())
def quantize_fp(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, signed: int,
                ebits: int, mbits: int, channel_bits: list[int]) -> torch.Tensor:
    """Static QuantizeFP: codes of (x - z) / s (z only for unsigned formats), as int8 bytes."""
    fmt = _fmt(signed, ebits, mbits)
    xf = x.float()
    u = xf / scale.float() if signed else (xf - zero_point.float()) / scale.float()
    return _encode_channels(u, fmt, channel_bits).view(torch.int8)


@quantize_fp.register_fake
def _(x, scale, zero_point, signed, ebits, mbits, channel_bits):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("export_engine::quantize_fp_dynamic", mutates_args=())
def quantize_fp_dynamic(x: torch.Tensor, signed: int, ebits: int, mbits: int,
                        axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token QuantizeFP: (codes, scale, zero_point), scale/zero point keepdim along ``axis``."""
    fmt = _fmt(signed, ebits, mbits)
    q = ActQuantizer(fmt.name, "dynamic", channel_axis=axis)
    scale, zp = q.dynamic_params(x)
    zp = torch.zeros_like(scale) if zp is None else zp
    xf = x.float()
    return fmt.encode_torch((xf - zp) / scale).view(torch.int8), scale, zp


@quantize_fp_dynamic.register_fake
def _(x, signed, ebits, mbits, axis):
    shape = list(x.shape)
    shape[axis] = 1
    s = x.new_empty(shape, dtype=torch.float32)
    return torch.empty_like(x, dtype=torch.int8), s, s.clone()


@torch.library.custom_op("export_engine::dequantize_fp", mutates_args=())
def dequantize_fp(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, signed: int,
                  ebits: int, mbits: int, channel_bits: list[int],
                  dtype: torch.dtype) -> torch.Tensor:
    """z + s * table[code] (z only for unsigned formats), cast to ``dtype``."""
    fmt = _fmt(signed, ebits, mbits)
    table = torch.from_numpy(onnx_ops.dequant_table(fmt, channel_bits))
    lo, row = min(channel_bits), 1 << max(channel_bits)
    offset = (torch.tensor(channel_bits) - lo) * row
    offset = offset.view((-1,) + (1,) * (codes.dim() - 1))
    vals = table[(codes.long() & 255) + offset]
    s, z = scale.float(), zero_point.float()
    y = s * vals if signed else z + s * vals
    return y.to(dtype)


@dequantize_fp.register_fake
def _(codes, scale, zero_point, signed, ebits, mbits, channel_bits, dtype):
    return torch.empty_like(codes, dtype=dtype)


@contextlib.contextmanager
def _registered_schemas():
    """Our ops' schemas in ONNX's global registry while torch.onnx exports (onnxscript builds
    custom-domain nodes only for ops with a registered schema), then removed again: a schema has
    no type inference, and ONNX's shape inference prefers a schema to the model's function body,
    so left registered it would leave every QuantizeFP/DequantizeFP output untyped for the rest of
    the process (graph passes' checks failed after any export in the same process)."""
    from onnx.defs import OpSchema

    def p(name, typ, optional=False):
        opt = OpSchema.FormalParameterOption.Optional if optional else \
            OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(name, typ, "", param_option=opt)

    def attr(name, typ):
        return OpSchema.Attribute(name, typ, "", required=False)

    ints, int_, floats = OpSchema.AttrType.INTS, OpSchema.AttrType.INT, OpSchema.AttrType.FLOATS
    fmt_attrs = [attr("signed", int_), attr("ebits", int_), attr("mbits", int_),
                 attr("bias", int_), attr("channel_bits", ints)]
    floatish = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schemas = [
        OpSchema("QuantizeFP", onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION,
                 inputs=[p("x", "T"), p("scale", "S"), p("zero_point", "S")],
                 outputs=[p("codes", "tensor(int8)"), p("scale_used", "tensor(float)", True),
                          p("zero_point_used", "tensor(float)", True)],
                 type_constraints=[("T", floatish, ""), ("S", floatish, "")],
                 attributes=fmt_attrs + [attr("axes", ints), attr("dynamic", int_)]),
        OpSchema("DequantizeFP", onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION,
                 inputs=[p("codes", "tensor(int8)"), p("scale", "S"), p("zero_point", "S")],
                 outputs=[p("y", "T")],
                 type_constraints=[("T", floatish, ""), ("S", floatish, "")],
                 attributes=fmt_attrs + [attr("table", floats), attr("output_dtype", int_)]),
    ]
    added = [sc for sc in schemas if not onnx.defs.has(sc.name, sc.domain)]
    for schema in added:
        onnx.defs.register_schema(schema)
    try:
        yield
    finally:
        for schema in added:
            onnx.defs.deregister_schema(schema.name, schema.since_version, schema.domain)


def _translations() -> dict:
    from onnxscript import values

    ee = values.Opset(onnx_ops.DOMAIN, onnx_ops.DOMAIN_VERSION)

    def fmt_attrs(signed, ebits, mbits, channel_bits):
        fmt = _fmt(signed, ebits, mbits)
        return dict(signed=int(signed), ebits=int(ebits), mbits=int(mbits), bias=fmt.bias,
                    channel_bits=[int(b) for b in channel_bits])

    def q_static(x, scale, zero_point, signed: int, ebits: int, mbits: int,
                 channel_bits: Sequence[int]):
        codes, _, _ = ee.QuantizeFP(x, scale, zero_point, axes=[0], dynamic=0,
                                    **fmt_attrs(signed, ebits, mbits, channel_bits))
        return codes

    def q_dynamic(x, signed: int, ebits: int, mbits: int, axis: int):
        from onnxscript import opset21 as op

        zero = op.Constant(value_float=0.0)
        return ee.QuantizeFP(x, zero, zero, axes=[int(axis)], dynamic=1,
                             **fmt_attrs(signed, ebits, mbits, [_fmt(signed, ebits, mbits).bits]))

    def dq(codes, scale, zero_point, signed: int, ebits: int, mbits: int,
           channel_bits: Sequence[int], dtype: int):
        fmt = _fmt(signed, ebits, mbits)
        return ee.DequantizeFP(codes, scale, zero_point,
                               table=onnx_ops.dequant_table(fmt, channel_bits).tolist(),
                               output_dtype=int(_onnx_dtype(dtype)),
                               **fmt_attrs(signed, ebits, mbits, channel_bits))

    return {torch.ops.export_engine.quantize_fp.default: q_static,
            torch.ops.export_engine.quantize_fp_dynamic.default: q_dynamic,
            torch.ops.export_engine.dequantize_fp.default: dq}


def _onnx_dtype(dtype) -> int:
    """TensorProto type of a torch dtype (the translation sees it as an int enum or a dtype)."""
    if isinstance(dtype, torch.dtype):
        return {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
                torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]
    return int(dtype)


# ---------------------------------------------------------------------------------------------
# Export-time forwards of the quantizers and TALoRA (patched on the instances, then restored)
# ---------------------------------------------------------------------------------------------
def _fmt_args(fmt: Format) -> tuple[int, int, int]:
    return int(fmt.signed), fmt.ebits, fmt.mbits


def _act_forward(self: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    if not self.enabled:
        return x
    args = _fmt_args(self.fmt)
    if self.mode == "dynamic":
        codes, scale, zp = torch.ops.export_engine.quantize_fp_dynamic(x, *args,
                                                                        self.channel_axis)
    else:  # nvfp4: block scales in plain ONNX ops, then a static QuantizeFP by them
        scale = nvfp4_block_scale(x, self.scale, _round_e4m3_ops) if self.mode == "nvfp4" else self.scale
        zp = self.zero_point
        codes = torch.ops.export_engine.quantize_fp(x, scale, zp, *args, [self.fmt.bits])
    bits = [self.fmt.bits]
    return torch.ops.export_engine.dequantize_fp(codes, scale, zp, *args, bits, x.dtype)


def _round_e4m3_ops(v: torch.Tensor) -> torch.Tensor:
    """v rounded to E4M3 by our ops (scale 1): what the NVFP4 block scales need in the graph."""
    args = _fmt_args(E4M3)
    one, zero = torch.ones((), dtype=torch.float32), torch.zeros((), dtype=torch.float32)
    codes = torch.ops.export_engine.quantize_fp(v, one, zero, *args, [E4M3.bits])
    return torch.ops.export_engine.dequantize_fp(codes, one, zero, *args, [E4M3.bits], torch.float32)


def _weight_forward(self: WeightQuantizer, w: torch.Tensor, bits: list[int]) -> torch.Tensor:
    if not self.enabled:
        return w
    args = _fmt_args(self.fmt)
    scale = self.scale.view((-1,) + (1,) * (w.dim() - 1))  # per output channel, broadcastable
    zero = torch.zeros((), dtype=torch.float32)
    codes = torch.ops.export_engine.quantize_fp(w, scale, zero, *args, bits)
    return torch.ops.export_engine.dequantize_fp(codes, scale, zero, *args, bits, w.dtype)


def _talora_delta(self: TALoRA) -> torch.Tensor:
    k = self.selection.export_index  # int64 [1]: Gather(adapter_table, timestep)
    # index_select keeps the index a tensor: one Gather per stack, no data-dependent scalar
    return self.scale * (self.B.index_select(0, k).squeeze(0) @ self.A.index_select(0, k).squeeze(0))


def check_exportable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized layers of ``model``; ExportError for anything the export cannot express."""
    from .layers import _QuantLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantLayer)]
    for name, layer in layers:
        if type(layer) not in SUPPORTED_LAYERS:
            raise ExportError(
                f"layer {name!r} is a {type(layer).__name__}; the ONNX export supports "
                f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} only")
        for q in (layer.a_quant, layer.w_quant):
            if q.enabled and q.fmt.kind != "float":
                raise ExportError(
                    f"layer {name!r} uses the integer format {q.fmt.name!r}; QuantizeFP exports "
                    "minifloat formats ([u]eXmY) only")
    if not layers:
        raise ExportError("the model has no quantized layers (QuantLinear / QuantConv2d); "
                          "quantize it first (export-engine quantize)")
    return layers


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's quantizers call the export_engine custom ops and TALoRA
    layers select their adapter by ``selection.export_index`` (set per forward by the wrapper)."""
    patched: list[tuple[object, str]] = []
    try:
        for _, layer in check_exportable(model):
            layer.a_quant.forward = types.MethodType(_act_forward, layer.a_quant)
            wq = layer.w_quant
            # buffers are fake tensors while torch.export traces: read the bit widths now
            bits = [int(b) for b in wq.bits.tolist()] if wq.mixed else [wq.fmt.bits]
            wq.forward = types.MethodType(
                lambda self, w, _bits=bits: _weight_forward(self, w, _bits), wq)
            patched += [(layer.a_quant, "forward"), (layer.w_quant, "forward")]
            if isinstance(layer.lora, TALoRA):
                layer.lora.delta = types.MethodType(_talora_delta, layer.lora)
                patched.append((layer.lora, "delta"))
        yield
    finally:
        for obj, attr in patched:
            obj.__dict__.pop(attr, None)


# ---------------------------------------------------------------------------------------------
# Model wrappers: flat named inputs; the TALoRA adapter is looked up from the timestep
# ---------------------------------------------------------------------------------------------
def talora_selections(model: nn.Module) -> list:
    """The distinct AdapterSelection objects of the model's TALoRA layers (usually one)."""
    seen: dict[int, object] = {}
    for _, layer in quant_layers(model):
        if isinstance(layer.lora, TALoRA):
            seen.setdefault(id(layer.lora.selection), layer.lora.selection)
    return list(seen.values())


def adapter_index(table: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Adapter of a timestep: ``table[clamp(round(t[0]), 0, len - 1)]`` (int64 [1]).

    The batch shares one timestep (as the router assumes); fractional timesteps round half to
    even (``exporter.finetune.TALoRAController.adapter_for_timestep``, the PyTorch side, does the
    same). In the graph: Gather(adapter_table, Clip(Cast(Round(timestep)))).
    """
    t = timestep.reshape(-1)[:1].float().round().long().clamp(0, table.numel() - 1)
    return table.index_select(0, t)


def select_adapter(model: nn.Module, table: torch.Tensor, timestep) -> int:
    """Point every TALoRA selection of ``model`` at the adapter of ``timestep`` (PyTorch side)."""
    k = int(adapter_index(table, torch.as_tensor(timestep)))
    for sel in talora_selections(model):
        sel.select(k)
    return k


def find_adapter_table(model: nn.Module) -> torch.Tensor | None:
    """The frozen timestep -> adapter table the model carries, or None.

    Looks for the TALoRA controller of :mod:`exporter.finetune` (``model.talora.table``, valid
    once ``frozen``) or any submodule attribute ``adapter_table``.
    """
    ctrl = getattr(model, "talora", None)
    if ctrl is not None and isinstance(getattr(ctrl, "table", None), torch.Tensor):
        if not getattr(ctrl, "frozen", True):
            raise ExportError("the TALoRA router is not frozen into its timestep -> adapter table "
                              "yet (exporter.finetune.freeze_router); the export needs the table")
        return ctrl.table
    for _, module in model.named_modules():
        table = getattr(module, "adapter_table", None)
        if isinstance(table, torch.Tensor):
            return table
    return None


@contextlib.contextmanager
def _talora_hooks_detached(model: nn.Module) -> Iterator[None]:
    """The TALoRA controller's hooks pick the adapter with Python ints (untraceable); the export
    wrapper does the same lookup with tensor ops instead, so the hooks step aside meanwhile."""
    ctrl = getattr(model, "talora", None)
    attached = bool(getattr(ctrl, "_handles", None))
    if attached:
        ctrl.detach()
    try:
        yield
    finally:
        if attached:
            ctrl.attach(model)


class _ExportWrapper(nn.Module):
    """Calls ``model`` with flat inputs; sets the TALoRA adapter from ``timestep`` first."""

    def __init__(self, model: nn.Module, call, table: torch.Tensor | None,
                 timestep_input: str | None):
        super().__init__()
        self.model = model
        self.call = call
        self.timestep_input = timestep_input
        self.selections = talora_selections(model)
        if self.selections:
            if table is None:
                raise ExportError(
                    "the model has TALoRA layers but no timestep -> adapter table; pass "
                    "adapter_table=... (a 1-D int64 tensor, frozen router choices)")
            k = self.selections[0].num_adapters
            table = torch.as_tensor(table).long().reshape(-1)
            if table.numel() == 0 or int(table.min()) < 0 or int(table.max()) >= k:
                raise ExportError(f"adapter_table must hold adapter indices in [0, {k}); "
                                  f"got {table.numel()} entries")
            self.register_buffer("adapter_table", table.clone(), persistent=False)

    def forward(self, *args):
        if self.selections:
            names = list(self._input_names)
            t = args[names.index(self.timestep_input)]
            k = adapter_index(self.adapter_table, t)
            for sel in self.selections:
                sel.export_index = k
        return self.call(self.model, *args)


def unet_call(unet, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
    """diffusers UNet2DConditionModel with flat inputs (SDXL's added conditions when given)."""
    kwargs = {}
    if text_embeds is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
    return unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]


def unet_example_inputs(unet, batch: int = 2, height: int | None = None, width: int | None = None,
                        text_len: int = 77, dtype=torch.float32, seed: int = 0
                        ) -> dict[str, torch.Tensor]:
    """Seeded inputs for a diffusers UNet2DConditionModel (SDXL text_time inputs when it has them)."""
    cfg = unet.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    height = height or max(2 * factor, 8)
    width = width or height
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, height, width, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        n_ids = 6
        text_dim = cfg.projection_class_embeddings_input_dim - n_ids * cfg.addition_time_embed_dim
        inputs["text_embeds"] = torch.randn(batch, text_dim, generator=g)
        inputs["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)
    return {k: (v.to(dtype) if k != "timestep" else v) for k, v in inputs.items()}


#: diffusers' Upsample2D branches on batch >= 64 (a contiguous() workaround), so a wider batch
#: range fails the first torch.export trace and torch.onnx retraces the whole UNet with max=63:
#: the range is given up front (that second trace was half the export time)
MAX_UNET_BATCH = 63


def unet_dynamic_shapes(unet, inputs: Mapping[str, torch.Tensor]) -> dict:
    """torch.export dims: batch, latent height/width (multiples of the UNet's down factor), text."""
    from torch.export import Dim

    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    batch = Dim("batch", min=1, max=MAX_UNET_BATCH)
    h, w = Dim("height_blocks", min=1, max=4096), Dim("width_blocks", min=1, max=4096)
    text = Dim("text_len", min=1, max=4096)
    shapes = {"sample": {0: batch, 2: factor * h, 3: factor * w}, "timestep": None,
              "encoder_hidden_states": {0: batch, 1: text}}
    if "text_embeds" in inputs:
        shapes.update(text_embeds={0: batch}, time_ids={0: batch})
    return {k: shapes[k] for k in inputs}


UNET_DIM_NAMES = {"sample": ["batch", None, "height", "width"],
                  "encoder_hidden_states": ["batch", "text_len", None],
                  "text_embeds": ["batch", None], "time_ids": ["batch", None],
                  "out_sample": ["batch", None, "height", "width"]}


# ---------------------------------------------------------------------------------------------
# fp16
# ---------------------------------------------------------------------------------------------
def to_fp16(model: nn.Module) -> nn.Module:
    """Convert ``model`` to float16 in place, keeping quantizer scales, zero points, MPQ-DM
    smoothing factors and LoRA/TALoRA factors float32 (so the fp16 export and the fp16 PyTorch
    reference quantize with the calibrated values and the same W + s B A, summed in float32:
    ``_QuantLayer.effective_weight``; the quantizers compute in float32 anyway)."""
    def fp32_parts(layer):
        return [layer.a_quant, layer.w_quant] + ([layer.lora] if layer.lora is not None else [])

    keep = {}
    for _, layer in quant_layers(model):
        for q in fp32_parts(layer):
            for pname, p in q.named_parameters(recurse=False):
                keep[(id(q), pname)] = p.detach().clone()
        if getattr(layer, "smooth", None) is not None:
            keep[(id(layer), "smooth")] = layer.smooth.clone()
    model.half()
    for _, layer in quant_layers(model):
        for q in fp32_parts(layer):
            for pname, p in q.named_parameters(recurse=False):
                p.grad = None  # a fine-tuned model's fp32 gradients were just cast to fp16
                p.data = keep[(id(q), pname)]
        if (id(layer), "smooth") in keep:
            layer.smooth = keep[(id(layer), "smooth")]
    return model


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    onnx_path: Path
    data_path: Path | None
    seconds: float
    num_quant_layers: int
    input_names: list[str] = field(default_factory=list)


def export_onnx(model: nn.Module, example_inputs: Mapping[str, torch.Tensor], path: str | Path, *,
                call=None, dynamic_shapes: Mapping | None = None,
                dim_names: Mapping[str, Sequence[str | None]] | None = None,
                output_names: Sequence[str] = ("out_sample",), timestep_input: str | None = "timestep",
                adapter_table: torch.Tensor | None = None, opset: int = onnx_ops.DEFAULT_OPSET,
                external_data: bool | None = None, debug_outputs: bool = False) -> ExportResult:
    """Export ``model`` (with QuantLinear / QuantConv2d layers) to ``path``.

    ``example_inputs``: graph input name -> example tensor, in call order; ``call(model, *inputs)``
    runs the model (default: ``model(*inputs)``). ``dynamic_shapes``: torch.export dims per input
    name; ``dim_names``: names given to the graph's dynamic dims. TALoRA layers need the
    ``adapter_table`` (found on the model when it carries one) and the ``timestep_input``.
    ``external_data``: None = only above 2 GB; the data file is ``<name>.onnx.data``.
    The write is atomic: on any error no .onnx (or data file) is left at ``path``.
    Deterministic: the same model and options give byte-identical files.
    ``debug_outputs``: also output every quantized layer's activation-quantizer input, codes and
    output (``<layer>.a_in``, ``<layer>.codes``, ``<layer>.out``) for :mod:`exporter.parity`.
    """
    path = Path(path)
    start = time.time()
    layers = check_exportable(model)
    _check_output_path(path)
    table = adapter_table if adapter_table is not None else find_adapter_table(model)
    wrapper = _ExportWrapper(model, call or (lambda m, *a: m(*a)), table, timestep_input)
    wrapper._input_names = list(example_inputs)
    if wrapper.selections and timestep_input not in example_inputs:
        raise ExportError(f"TALoRA needs the timestep input {timestep_input!r} among the inputs "
                          f"{list(example_inputs)}")
    args = tuple(example_inputs.values())
    shapes = None
    if dynamic_shapes is not None:
        shapes = tuple(dynamic_shapes.get(k) for k in example_inputs)
    was_training = model.training
    model.eval()
    try:
        with export_mode(model), _talora_hooks_detached(model), torch.no_grad(), \
                _quiet_torch_onnx(), _registered_schemas():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=list(example_inputs),
                output_names=list(output_names), dynamic_shapes=(shapes,) if shapes else None,
                custom_translation_table=_translations(), opset_version=opset, optimize=False,
                verbose=False)
    except ExportError:
        raise
    except Exception as err:  # torch.export / translation failures: say which stage
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from err
    finally:
        for sel in wrapper.selections:
            sel.__dict__.pop("export_index", None)
        model.train(was_training)
    ir_model = program.model
    state = {n for n, _ in wrapper.named_parameters()} | {n for n, _ in wrapper.named_buffers()}
    _fold_shape_constants(ir_model, state)
    _cast_concat_inputs(ir_model)
    _finish_model(ir_model, opset, dim_names or {}, [n for n, _ in layers], debug_outputs)
    data_path = _save_atomic(ir_model, path, external_data)
    return ExportResult(path, data_path, time.time() - start, len(layers), list(example_inputs))


def export_unet(unet: nn.Module, path: str | Path, *, batch: int = 2, height: int | None = None,
                width: int | None = None, text_len: int = 77, fp16: bool = False,
                adapter_table: torch.Tensor | None = None, **kwargs) -> ExportResult:
    """Export a quantized diffusers UNet2DConditionModel with dynamic batch/height/width/text.

    ``fp16``: converts the model to float16 in place first (:func:`to_fp16`).
    Inputs: sample, timestep [] (float32), encoder_hidden_states (and text_embeds, time_ids for
    SDXL); output: out_sample.
    """
    if fp16:
        to_fp16(unet)
    dtype = next(unet.parameters()).dtype
    inputs = unet_example_inputs(unet, batch, height, width, text_len, dtype)
    return export_onnx(unet, inputs, path, call=lambda m, *a: unet_call(m, *a),
                       dynamic_shapes=unet_dynamic_shapes(unet, inputs), dim_names=UNET_DIM_NAMES,
                       adapter_table=adapter_table, **kwargs)


@contextlib.contextmanager
def _quiet_torch_onnx():
    """torch.onnx prints progress lines and warnings per export; keep them out of the CLI output
    (also its logged "torchvision is not installed" line per torchvision op it knows: we export
    no torchvision op)."""
    import io
    import logging
    import warnings
    from contextlib import redirect_stdout

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def _check_output_path(path: Path) -> None:
    if path.suffix != ".onnx":
        raise ExportError(f"output path {path} must end in .onnx")
    if path.is_dir():
        raise ExportError(f"output path {path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path.parent, prefix=".partial-probe-")
        probe.close()
    except OSError as err:
        raise ExportError(f"cannot write to {path.parent}: {err.strerror or err}") from None


def _finish_model(model, opset: int, dim_names: Mapping[str, Sequence[str | None]],
                  layer_names: Sequence[str] = (), debug_outputs: bool = False) -> None:
    """Name our nodes after their layers, drop tracing metadata, rename dims, attach functions.

    ``debug_outputs`` adds per quantized layer the graph outputs ``<layer>.a_in`` (the input of
    its activation QuantizeFP), ``<layer>.codes`` (its codes) and ``<layer>.out`` (the layer's
    output), for the layer-by-layer parity harness. Without it the layers' output values are
    recorded in the model's metadata (:data:`LAYER_OUTPUTS_KEY`), so that
    :func:`add_debug_outputs` can expose the same values later without a second export.
    """
    import onnx_ir as ir

    last_in_layer: dict[str, object] = {}
    layers = set(layer_names)
    named: dict[str, object] = {}
    for node in model.graph:
        scopes = _scopes(node.metadata_props.get("pkg.torch.onnx.name_scopes", ""))
        if node.domain == onnx_ops.DOMAIN:
            owner = next((p for p in reversed(scopes) if p.endswith((".a_quant", ".w_quant"))), None)
            if owner:
                # the quantizer's own pair comes last; an earlier one of the same quantizer is
                # the rounding of NVFP4 block scales (exporter.quantizers.nvfp4_block_scale)
                name = f"{owner}/{node.op_type}"
                if name in named:
                    named[name].name = f"{owner}/block_scale/{node.op_type}"
                node.name, named[name] = name, node
        for p in scopes:
            if p in layers:
                last_in_layer[p] = node
        node.metadata_props.clear()
        node.doc_string = None
    # the scopes that say which value is a layer's output are gone after this function
    layer_outputs = {layer: node.outputs[0] for layer, node in last_in_layer.items()}
    model.graph.metadata_props.clear()
    model.metadata_props.clear()
    if debug_outputs:
        _expose_layers(model, named, layer_outputs)
    else:
        model.metadata_props[LAYER_OUTPUTS_KEY] = json.dumps(
            [[layer, value.name] for layer, value in layer_outputs.items()], separators=(",", ":"))
    model.doc_string = None
    for value in list(model.graph.initializers.values()):
        if value.name.startswith("model."):
            value.name = value.name[len("model."):]
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        names = dim_names.get(value.name)
        if names and value.shape is not None and len(names) == len(value.shape):
            value.shape = ir.Shape([n if n is not None else d for n, d in zip(names, value.shape)])
    model.opset_imports[""] = opset
    model.opset_imports[onnx_ops.DOMAIN] = onnx_ops.DOMAIN_VERSION
    for proto in (onnx_ops.quantize_fp_function(opset), onnx_ops.dequantize_fp_function(opset)):
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn
    model.ir_version = 10
    model.producer_name = "export-engine"
    model.producer_version = None


def _cast_concat_inputs(model) -> None:
    """torch.cat promotes mixed dtypes, but the exporter emits a plain Concat, which ONNX requires
    to have one input type. In an fp16 SDXL UNet, text_embeds (fp16) meets the fp32 sinusoidal
    embedding of time_ids; cast such inputs to the output's dtype, as torch did."""
    import onnx_ir as ir

    for node in list(model.graph):
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        dtype = node.outputs[0].dtype
        for i, value in enumerate(node.inputs):
            if value is None or dtype is None or value.dtype in (None, dtype):
                continue
            cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", int(dtype))],
                           name=f"{node.name}/cast_input_{i}")
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = f"{node.name}/cast_input_{i}_out", dtype, value.shape
            model.graph.insert_before(node, cast)
            node.replace_input_with(i, cast.outputs[0])


def _fold_shape_constants(model, state_names: set[str]) -> None:
    """Fold constant shape arithmetic and turn SplitToSequence/SequenceAt (from torch.split/chunk)
    into Split, which TensorRT parses (and ONNX Runtime's Slice fusions need constant axes).
    Nodes that read a model parameter or buffer (``state_names``) are never folded, so weights,
    scales and the LoRA subgraph stay as exported (graph passes fold them on purpose)."""
    import onnx_ir as ir
    from onnxscript import optimizer

    def reads_state(node) -> bool | None:
        if any(v is not None and v.is_initializer() and v.name in state_names for v in node.inputs):
            return False
        return None

    optimizer.fold_constants(model, should_fold=reads_state)
    ir.passes.common.RemoveUnusedNodesPass()(model)


def _scopes(text: str) -> list[str]:
    """Module names (without the wrapper's 'model.') from dynamo's name-scope metadata."""
    import ast

    try:
        parts = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return [p[len("model."):] for p in parts if isinstance(p, str) and p.startswith("model.")]


def _expose_layers(model, quant_nodes: Mapping[str, object], layer_outputs: Mapping[str, object]) -> None:
    """The debug outputs: every layer's activation-quantizer input and codes (its QuantizeFP node
    ``<layer>.a_quant/QuantizeFP``), then every layer's output value, in graph order.

    A 16-bit input is cast to float32 before the quantizer (which computes in float32 anyway),
    and that Cast's output, the quantizer's own input, is exposed: ONNX Runtime's CPU provider
    runs fp16 ops in fp32 and removes an "fp32 -> fp16 -> fp32" Cast pair, so the quantizer may
    read an unrounded fp32 value, which an fp16 output would not show (docs/parity.md)."""
    import onnx_ir as ir

    for name, node in quant_nodes.items():
        if name.endswith(".a_quant/QuantizeFP"):
            layer = name[: -len(".a_quant/QuantizeFP")]
            x = node.inputs[0]
            if x.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                cast = ir.Node("", "Cast", [x], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                               name=f"{layer}.a_quant/a_in_float")
                cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, x.shape
                model.graph.insert_before(node, cast)
                node.replace_input_with(0, cast.outputs[0])
                x = cast.outputs[0]
            _expose(model, x, f"{layer}.a_in")
            _expose(model, node.outputs[0], f"{layer}.codes")
    for layer, value in layer_outputs.items():
        _expose(model, value, f"{layer}.out")


def add_debug_outputs(src: str | Path, dst: str | Path) -> Path:
    """Write ``src`` (an export made without ``debug_outputs``) to ``dst`` with the debug outputs
    that ``export_onnx(debug_outputs=True)`` would have given it: the same graph, the same output
    names and order, without tracing the model again (a full SDXL export takes many minutes).
    ``dst`` gets its own data file when ``src`` has one."""
    import onnx_ir as ir

    src, dst = Path(src), Path(dst)
    _check_output_path(dst)
    model = ir.load(src)
    recorded = model.metadata_props.pop(LAYER_OUTPUTS_KEY, None)
    if recorded is None:
        raise ExportError(f"{src} records no layer outputs: it is a debug export already, or was "
                          f"made by an older export-engine; export it again")
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    quant_nodes = {node.name: node for node in model.graph if node.domain == onnx_ops.DOMAIN}
    try:
        layer_outputs = {layer: values[name] for layer, name in json.loads(recorded)}
    except (KeyError, ValueError, TypeError) as err:
        raise ExportError(f"{src}: its recorded layer outputs do not match its graph ({err}); "
                          f"export it again") from None
    _expose_layers(model, quant_nodes, layer_outputs)
    _save_atomic(model, dst, external_data=src.with_name(src.name + ".data").exists())
    return dst


def _expose(model, value, name: str) -> None:
    """Make ``value`` a graph output called ``name`` (an Identity keeps graph inputs intact)."""
    import onnx_ir as ir

    if value.name in model.graph.initializers or value.is_graph_input() or value.is_graph_output():
        node = ir.Node("", "Identity", [value], name=f"{name}/expose")
        model.graph.append(node)
        node.outputs[0].type, node.outputs[0].shape = value.type, value.shape
        value = node.outputs[0]
    value.name = name
    model.graph.outputs.append(value)


def _save_atomic(model, path: Path, external_data: bool | None) -> Path | None:
    """Write model (+ one data file) into a temporary folder beside ``path``, then move into place."""
    import onnx_ir as ir

    nbytes = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                 if v.const_value is not None)
    use_external = nbytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".partial-{path.name}."))
    try:
        tmp_onnx = tmp_dir / path.name
        if use_external:
            ir.save(model, tmp_onnx, external_data=data_name)
        else:
            ir.save(model, tmp_onnx)
        data_dest = path.with_name(data_name)
        if use_external:
            os.replace(tmp_dir / data_name, data_dest)
        elif data_dest.exists():
            data_dest.unlink()  # a stale data file of an earlier external-data export
        os.replace(tmp_onnx, path)  # the .onnx goes last: it only appears once complete
        return data_dest if use_external else None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# One layer alone (parity harness, tests)
# ---------------------------------------------------------------------------------------------
def export_layer(layer: nn.Module, x: torch.Tensor, path: str | Path, *,
                 adapter: int | None = None, opset: int = onnx_ops.DEFAULT_OPSET) -> ExportResult:
    """Export one QuantLinear / QuantConv2d alone (input ``x``, output ``y``), static shapes.

    For a TALoRA layer the adapter is fixed to ``adapter`` (default: the selection's current one)
    through a one-entry table, so the graph has the same Gather pattern as the full export.
    """
    if not isinstance(layer, SUPPORTED_LAYERS):
        raise ExportError(f"export_layer takes a QuantLinear or QuantConv2d, got {type(layer).__name__}")
    wrapper = nn.Sequential()
    wrapper.add_module("layer", layer)
    table, inputs = None, {"x": x}
    if isinstance(layer.lora, TALoRA):
        k = layer.lora.selection.index if adapter is None else int(adapter)
        table = torch.tensor([k])
        inputs["timestep"] = torch.zeros(())
    return export_onnx(wrapper, inputs, path, call=lambda m, x, *t: m(x), output_names=("y",),
                       adapter_table=table, opset=opset)
