"""The quantize stage: FP UNet -> MSFP-quantized UNet (+ report), usable from Python and the CLI.

    model, report = quantize_model("sdxl-tiny", scheme="w4a4", finetune_steps=40)
    save_checkpoint(model, "models/sdxl-tiny-w4a4", report)

Steps: build the preset (weights or seeded random) -> calibration trajectories
with per-layer captures -> per-layer MSFP search (formats, scales, AAL,
MPQ-DM smoothing and bits) -> swap in QuantLinear / QuantConv2d -> optional
TALoRA + DFA fine-tuning -> frozen router table. All quantization state lives
in the quantized layers (``w_quant``, ``a_quant``, ``smooth``, ``lora``) and in
``unet.talora``; ``exporter.checkpoint`` saves exactly that.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .calibration import CalibConfig, CalibrationData, collect_calibration
from .cli import UserError
from .finetune import WEIGHTINGS, eval_metrics, finetune
from .formats import SIGNED_FP4, UNSIGNED_FP4
from .gptq import AUTO_MAX_BYTES as GPTQ_AUTO_MAX_BYTES
from .gptq import gptq_layer, hessian_bytes
from .layers import QUANT_LAYERS, quant_layers, swap_quant_layers
from .models.presets import Preset, get_preset
from .msfp import (SIGNED_FP8, UNSIGNED_FP8, LayerChoice, SearchSpace, apply_choice, nvfp4_space,
                   search_layer)

#: weight / activation settings per scheme (weights are always 4-bit FP)
SCHEMES = {
    "w4a4": {"a_signed": SIGNED_FP4, "a_unsigned": UNSIGNED_FP4, "a_mode": "static"},
    "w4a8": {"a_signed": SIGNED_FP8, "a_unsigned": UNSIGNED_FP8, "a_mode": "static"},
    "w4a16": {"a_signed": (), "a_unsigned": (), "a_mode": None},
}
#: models above this many parameters skip the end-to-end evaluation unless asked
#: (on a CPU each quantized SDXL forward re-quantizes 2.6 B weights: about a minute)
EVAL_AUTO_MAX_PARAMS = 200_000_000


@dataclass
class QuantizeConfig:
    """Options of the quantize stage; ``None`` means the preset's default for the device."""

    scheme: str = "w4a4"
    calib_samples: int | None = None
    calib_steps: int | None = None
    resolution: int | None = None
    scheduler: str = "euler"
    calib_embeddings: str | None = None
    calib_holdout: int | None = None  # held-out samples (default: a quarter)
    max_tokens: int | None = None
    finetune_steps: int | None = None
    lora_rank: int = 4
    adapters: int = 4
    finetune_lr: float = 5e-4
    finetune_batch: int = 4
    finetune_weighting: str = "uniform"  # timesteps' weights in the loss (finetune.WEIGHTINGS; measured: docs)
    finetune_fresh_noise: bool = True  # targets: the float model on freshly noised clean latents (finetune)
    include: str | None = None  # regex: only layers whose name matches are quantized
    exclude: str | None = None  # regex: layers kept in higher precision (None: the preset's keep_fp)
    keep_fp_shortcuts: bool = True  # with exclude None: also the last up block's conv_shortcut layers (presets.last_up_shortcuts)
    act_mode: str = "static"  # or "dynamic" (per token, Linear layers)
    a8_budget: float = 0.0  # w4a4: share of the quantized layers' MACs whose activations get 8-bit e4m3 (a8_layers)
    # w4a4: every convolution gets 8-bit e4m3 activations. No target runs a convolution on FP4
    # hardware (fp8/native: FP8 GEMMs, plugin: decoded to fp16/fp32), so this costs no speed anywhere
    a8_convs: bool = False
    search: str = "pruned"  # or "exhaustive"
    mixup: bool = True  # unsigned formats for AALs (False: signed FP4 only)
    mixed_precision: bool = True  # MPQ-DM smoothing + N-1/N/N+1 bits
    nvfp4: bool = False  # Linear layers quantized the NVFP4 way (msfp.nvfp4_space), for Blackwell
    gptq: bool | None = None  # GPTQ weight rounding (exporter.gptq); None: when its Hessians fit gptq.AUTO_MAX_BYTES
    seed: int = 0
    device: str | None = None
    evaluate: bool | None = None  # end-to-end metrics (None: only for models < 200 M parameters)
    threads: int | None = None  # torch CPU threads for calibration, evaluation, fine-tuning (None: DEFAULT_THREADS)

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise UserError(f"unknown scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if self.search not in ("pruned", "exhaustive"):
            raise UserError(f"search must be 'pruned' or 'exhaustive', got {self.search!r}")
        if not isinstance(self.finetune_fresh_noise, bool):
            raise UserError(f"finetune_fresh_noise must be true or false, got {self.finetune_fresh_noise!r}")
        if self.finetune_weighting not in WEIGHTINGS:
            raise UserError(f"--finetune-weighting must be one of {', '.join(WEIGHTINGS)}, "
                            f"got {self.finetune_weighting!r}")
        if self.act_mode not in ("static", "dynamic"):
            raise UserError(f"activation mode must be 'static' or 'dynamic', got {self.act_mode!r}")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise UserError(f"--lora-rank must be a positive integer, got {self.lora_rank!r}")
        if not isinstance(self.adapters, int) or self.adapters < 1:
            raise UserError(f"--adapters (TALoRA K) must be a positive integer, got {self.adapters!r}")
        for name, flag in (("calib_samples", "--calib-samples"), ("calib_steps", "--calib-steps"),
                           ("resolution", "--calib-resolution"), ("max_tokens", "max_tokens")):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError(f"{flag} must be a positive integer, got {value!r}")
        if isinstance(self.a8_budget, bool) or not isinstance(self.a8_budget, (int, float)) \
                or not 0.0 <= self.a8_budget <= 1.0:
            raise UserError(f"--a8-budget must be a fraction of the MACs in [0, 1], got {self.a8_budget!r}")
        if not isinstance(self.a8_convs, bool):
            raise UserError(f"a8_convs must be true or false, got {self.a8_convs!r}")
        for flag, on in (("--a8-budget", self.a8_budget > 0), ("--a8-convs", self.a8_convs)):
            if on and self.scheme != "w4a4":
                raise UserError(f"{flag} gives W4A4 layers 8-bit activations; scheme {self.scheme} "
                                "has no 4-bit activations to raise")
        if self.gptq not in (None, True, False):
            raise UserError(f"gptq must be true, false or null (automatic), got {self.gptq!r}")
        if self.finetune_steps is not None and self.finetune_steps < 0:
            raise UserError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads < 1):
            raise UserError(f"--threads must be a positive integer, got {self.threads!r}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value:
                try:
                    re.compile(value)
                except re.error as err:
                    raise UserError(f"--{name} {value!r} is not a valid regular expression ({err})") from None

    def exclude_regex(self, preset: Preset) -> str:
        """Layers kept in higher precision: ``--exclude``, else the preset's keep-list (with the
        last up block's shortcuts unless ``keep_fp_shortcuts`` is off)."""
        return preset.keep_fp_regex(self.keep_fp_shortcuts) if self.exclude is None else self.exclude

    def search_space(self) -> SearchSpace:
        s = SCHEMES[self.scheme]
        return SearchSpace(
            a_signed=s["a_signed"], a_unsigned=s["a_unsigned"] if self.mixup else (),
            a_mode=None if s["a_mode"] is None else self.act_mode,
            mixed_precision=self.mixed_precision, smoothing=self.mixed_precision,
            exhaustive=self.search == "exhaustive", nvfp4_linear=self.nvfp4)

    def a8_space(self) -> SearchSpace:
        """The search space of an ``a8_budget`` layer: the scheme's weights, activations in
        A8_FORMATS (MSFP weights also for Linear layers under ``nvfp4``: at 8-bit activations the
        layer cannot run on FP4 tensor cores anyway)."""
        return dataclasses.replace(self.search_space(), a_signed=A8_FORMATS, a_unsigned=(), nvfp4_linear=False)


#: activation format of the layers ``a8_budget`` raises: signed e4m3 only. Every e4m3 value is an
#: FP8 E4M3FN value, so the fp8 target still runs these layers as FP8 GEMMs, at the speed of its
#: W4A4 layers (which it also runs in FP8); e3m4 and the unsigned FP8 formats would fall back to
#: reference ops there (graph_passes.fp8.format_exact_in_e4m3).
A8_FORMATS = ("e4m3",)


@dataclass
class QuantizeReport:
    preset: str
    scheme: str
    config: dict
    base_config_hash: str
    random_weights: bool
    layers: list[dict] = field(default_factory=list)
    kept_fp: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    finetune: dict | None = None
    a8: dict | None = None  # a8_budget: the raised layers, their share of the MACs, every layer's cost
    gptq: dict | None = None  # GPTQ: layers, per-layer errors vs round-to-nearest (gptq_layers)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready (non-finite floats become None)."""
        return _json_safe(dataclasses.asdict(self))

    def summary(self) -> str:
        n = len(self.layers)
        aal = sum(r["aal"] for r in self.layers)
        unsigned = sum(1 for r in self.layers if (r["a_format"] or "").startswith("u"))
        mixed = sum(1 for r in self.layers if r["mp_k"] > 0)
        smooth = sum(r["smooth"] for r in self.layers)
        sq = [r["sqnr_db"] for r in self.layers if math.isfinite(r["sqnr_db"])]
        lines = [
            f"{self.preset} {self.scheme}: {n} layers quantized, {len(self.kept_fp)} kept in higher precision",
            f"  AAL inputs {aal}, unsigned activation formats {unsigned}, smoothed {smooth}, "
            f"mixed-precision {mixed}",
            f"  per-layer output SQNR (calibration rows, round-to-nearest weights): median {_median(sq):.2f} dB, "
            f"min {min(sq, default=0):.2f} dB",
        ]
        if self.gptq:
            lines.append(f"  GPTQ: {self.gptq['layers']} layers, weight output error x{self.gptq['error_ratio']:.3f} "
                         f"of round-to-nearest ({len(self.gptq['round_to_nearest'])} left at round-to-nearest)")
        for k, v in self.metrics.items():
            lines.append(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
        ptq, tuned = self.metrics.get("ptq_eps_sqnr_db"), self.metrics.get("finetuned_eps_sqnr_db")
        if ptq is not None and tuned is not None and tuned < ptq:
            on = "held-out" if self.calibration.get("holdout") else "calibration"
            lines.append(f"  note: fine-tuning lowered the eps SQNR on the {on} samples ({tuned:.2f} dB, PTQ "
                         f"{ptq:.2f} dB); the checkpoint keeps the fine-tuned model, --finetune-steps 0 gives "
                         f"the PTQ one" + (" (seeded random weights: neither number means much)"
                                           if self.random_weights else ""))
        lines.append("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


#: torch CPU threads for the quantize stage's float math. A float reduction's result depends on how
#: it is split over threads (measured: the sdxl-tiny UNet's outputs and gradients differ with 1, 2,
#: 3 and 4 threads), so the thread count is part of the command, never taken from the machine:
#: the same command gives the same checkpoint on a 2-core laptop and a 64-core server.
DEFAULT_THREADS = 1


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with torch on ``n`` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def search_workers() -> int:
    """Parallel layer searches: the cores this process may run on (its CPU affinity, so a
    ``taskset`` or a container's CPU set counts). Each search is single-threaded, so its result
    does not depend on this number."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _median(v: list[float]) -> float:
    v = sorted(v)
    return v[len(v) // 2] if v else float("nan")


def select_layers(model: nn.Module, include: str | None, exclude: str | None) -> tuple[list[str], list[str]]:
    """(names to quantize, Linear/Conv2d names kept in higher precision), in module order."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    quantize, keep = [], []
    for name, m in model.named_modules():
        if type(m) not in QUANT_LAYERS or not name:
            continue
        if (inc is None or inc.search(name)) and not (exc and exc.search(name)):
            quantize.append(name)
        else:
            keep.append(name)
    return quantize, keep


def _each_layer(names: list[str], sizes: list[int], fn: Callable[[int, str], object], workers: int,
                progress: Callable[[str], None] | None, label: str) -> dict:
    """``fn(i, name)`` for every layer on ``workers`` Python threads, torch single-threaded (so
    no result depends on thread settings; torch releases the GIL in its kernels, and independent
    layers never wait for each other, which uses a busy machine's cores well); largest first, so
    the last ones to finish are small. Returns {name: result} in ``names`` order."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    out: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        order = sorted(range(len(names)), key=lambda i: -sizes[i])
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(fn, i, names[i]): names[i] for i in order}
            for done, fut in enumerate(as_completed(futures), 1):
                out[futures[fut]] = fut.result()
                if progress and (done % max(1, len(names) // 20) == 0 or done == len(names)):
                    progress(f"{label}: layer {done}/{len(names)}")
    finally:
        torch.set_num_threads(threads)
    return {n: out[n] for n in names}


def search_layers(model: nn.Module, calib: CalibrationData, names: list[str], space: SearchSpace,
                  seed: int = 0, progress: Callable[[str], None] | None = None,
                  keep_captures: bool = False, workers: int = 1) -> dict[str, LayerChoice]:
    """Run the MSFP search on each captured layer of the FP ``model`` (layer i seeded ``seed + i``),
    ``workers`` layers at once (:func:`_each_layer`)."""
    def one(i: int, name: str) -> LayerChoice:
        cap = calib.layers[name] if keep_captures else calib.layers.pop(name)
        layer = model.get_submodule(name)
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1).float().cpu()
        bias = None if layer.bias is None else layer.bias.detach().float().cpu()
        sp = nvfp4_space(space) if space.nvfp4_linear and isinstance(layer, nn.Linear) else space
        return search_layer(cap.x, w, bias, cap.ch_min, cap.ch_max, cap.taps, sp, seed=seed + i)

    sizes = [model.get_submodule(n).weight.numel() for n in names]
    return _each_layer(names, sizes, one, workers, progress, "search")


def gptq_layers(model: nn.Module, calib: CalibrationData, keep_float: bool = False,
                progress: Callable[[str], None] | None = None, workers: int = 1) -> dict:
    """GPTQ-round every quantized layer of ``model`` whose capture has a Hessian (exporter.gptq),
    ``workers`` at once; frees the Hessians. Returns the report's ``gptq`` entry: per layer the
    calibration-set output error of round-to-nearest and of GPTQ, and the layers left at
    round-to-nearest (fan-in over gptq.MAX_FAN_IN)."""
    names = [n for n, _ in quant_layers(model) if n in calib.layers and calib.layers[n].h is not None]
    skipped = [n for n, _ in quant_layers(model) if n not in names]

    def one(i: int, name: str) -> dict:
        return gptq_layer(model.get_submodule(name), calib.layers[name].h, keep_float=keep_float)

    sizes = [model.get_submodule(n).weight[0].numel() ** 2 for n in names]
    errors = _each_layer(names, sizes, one, workers, progress, "GPTQ")
    for n in names:
        calib.layers[n].h = None
    rtn, gq = sum(e["rtn"] for e in errors.values()), sum(e["gptq"] for e in errors.values())
    return {"layers": len(names), "round_to_nearest": skipped, "errors": errors,
            "error_ratio": gq / rtn if rtn > 0 else 1.0}


def apply_choices(model: nn.Module, choices: dict[str, LayerChoice]) -> nn.Module:
    """Swap the chosen layers for QuantLinear / QuantConv2d in place and write the choices into them."""
    def make(name, layer):
        q = QUANT_LAYERS[type(layer)](layer)
        apply_choice(q, choices[name])
        return q.to(layer.weight.device)

    swap_quant_layers(model, include=lambda n: n in choices, factory=make)
    for _, layer in quant_layers(model):
        for p in list(layer.w_quant.parameters()) + list(layer.a_quant.parameters()):
            p.requires_grad_(False)
    return model


#: training samples per calibration record that activation_costs runs: the cost is one forward per
#: layer and record, so this bounds it on big models (SDXL: 257 layers x 10 records)
A8_COST_SAMPLES = 2


def activation_costs(model: nn.Module, calib: CalibrationData) -> tuple[dict[str, float], dict[str, int]]:
    """(cost, MACs) of each quantized layer of ``model``: the squared error of the UNet's noise
    prediction, summed over every calibration record's first A8_COST_SAMPLES training samples, with only that layer's
    activations quantized (its weights and every other layer in float), and the layer's
    multiply-accumulates in those forwards.

    Measured end to end because a layer's own output SQNR says little about what reaches eps: on
    the trained tiny UNet the costliest layers sit in the last up block, right before the output
    (docs/quantization.md, 'Quality on a trained model'). One forward per layer and record.
    """
    from .models.presets import run_unet

    layers = dict(quant_layers(model))
    state = {n: (m.w_quant.enabled, m.a_quant.enabled) for n, m in layers.items()}
    device = next(model.parameters()).device
    idx = torch.tensor(calib.train[:A8_COST_SAMPLES])
    feeds = [{k: (v[idx] if v.dim() > 0 else v).to(device) for k, v in r.inputs.items()} for r in calib.records]
    macs = dict.fromkeys(layers, 0)

    def count(name):
        def hook(module, args, out):
            macs[name] += out.numel() * module.fan_in
        return hook

    costs = {}
    try:
        for m in layers.values():
            m.w_quant.enabled = m.a_quant.enabled = False
        handles = [m.register_forward_hook(count(n)) for n, m in layers.items()]
        with torch.no_grad():
            try:
                ref = [run_unet(model, f).float() for f in feeds]  # the float model (smoothing included)
            finally:
                for h in handles:
                    h.remove()
            for name, m in layers.items():
                if not state[name][1]:  # activations not quantized: nothing to raise
                    costs[name] = 0.0
                    continue
                m.a_quant.enabled = True
                costs[name] = sum(float((run_unet(model, f).float() - y).pow(2).sum()) for f, y in zip(feeds, ref))
                m.a_quant.enabled = False
    finally:
        for n, m in layers.items():
            m.w_quant.enabled, m.a_quant.enabled = state[n]
    return costs, macs


def a8_layers(costs: dict[str, float], macs: dict[str, int], budget: float) -> list[str]:
    """Layers whose activations get 8 bits: by cost per MAC (what a MAC of 8-bit activations buys),
    greedily while their MACs fit in ``budget`` x all the layers' MACs; in ``costs`` order.
    ``budget`` 1 gives every layer 8 bits."""
    limit, spent, pick = budget * sum(macs.values()), 0, set()
    for name in sorted(costs, key=lambda n: -costs[n] / max(macs[n], 1)):
        if costs[name] > 0 and spent + macs[name] <= limit:
            pick.add(name)
            spent += macs[name]
    return [n for n in costs if n in pick]


def layer_rows(model: nn.Module, choices: dict[str, LayerChoice]) -> list[dict]:
    rows = []
    for name, c in choices.items():
        layer = model.get_submodule(name)
        bits = torch.bincount(c.w_bits.long(), minlength=9)
        rows.append({
            "name": name, "type": "Conv2d" if layer.weight.dim() == 4 else "Linear",
            "out": int(layer.weight.shape[0]), "fan_in": int(layer.weight[0].numel()),
            "aal": c.aal, "w_format": c.w_format,
            "w_bits": {str(b): int(bits[b]) for b in range(9) if bits[b]},
            "mp_k": c.mp_k, "a_format": c.a_format, "a_mode": c.a_mode,
            "a_scale": c.a_scale, "a_zero": c.a_zero, "smooth": c.smooth is not None,
            "sqnr_db": c.sqnr_db,
        })
    return rows


def calib_config(preset: Preset, cfg: QuantizeConfig, device: str) -> CalibConfig:
    d = preset.defaults(device)
    return CalibConfig(
        samples=d.samples if cfg.calib_samples is None else cfg.calib_samples,
        steps=d.steps if cfg.calib_steps is None else cfg.calib_steps,
        resolution=d.resolution if cfg.resolution is None else cfg.resolution, scheduler=cfg.scheduler,
        seed=cfg.seed, embeddings=cfg.calib_embeddings, holdout=cfg.calib_holdout,
        max_tokens=d.max_tokens if cfg.max_tokens is None else cfg.max_tokens)


def quantize_model(preset: str | Preset, config: QuantizeConfig | None = None, *,
                   model_path: str | None = None, model: nn.Module | None = None,
                   progress: Callable[[str], None] | None = None, **overrides):
    """Quantize a preset's UNet; returns ``(model, QuantizeReport)``.

    preset: name in ``exporter.models.PRESETS`` or a Preset. config / overrides:
    :class:`QuantizeConfig` fields (``quantize_model("sdxl-tiny", scheme="w4a8")``).
    model: an already built FP UNet of that preset (else built from
    ``model_path`` or seeded random weights). The returned model is the same
    UNet with QuantLinear / QuantConv2d layers, ``unet.talora`` when
    fine-tuned, and ``unet.quantization`` (a dict: preset, scheme, config hash).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    preset = preset.for_model_path(model_path)  # a diffusers folder's config.json defines the UNet
    cfg = dataclasses.replace(config or QuantizeConfig(), **overrides)
    cfg.validate()
    if cfg.threads is None:
        cfg = dataclasses.replace(cfg, threads=DEFAULT_THREADS)  # the report records what ran
    with torch_threads(cfg.threads):
        return _quantize(preset, cfg, model_path, model, progress)


def _quantize(preset: Preset, cfg: QuantizeConfig, model_path: str | None, model: nn.Module | None,
              progress: Callable[[str], None] | None):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    random_weights = model is None and model_path is None
    if model is None:
        say(f"building {preset.name}" + (f" from {model_path}" if model_path else " (seeded random weights)"))
        model = preset.build(model_path, seed=cfg.seed, device=device)
    seconds["build"] = time.perf_counter() - t0

    exclude = cfg.exclude_regex(preset)
    names, kept = select_layers(model, cfg.include, exclude)
    if not names:
        raise UserError(f"no layer of {preset.name} matches --include {cfg.include!r} / --exclude {exclude!r}")
    if cfg.gptq is None:  # automatic: when the Hessians are small next to the model
        fan_ins = [model.get_submodule(n).weight[0].numel() for n in names]
        cfg = dataclasses.replace(cfg, gptq=hessian_bytes(fan_ins) <= GPTQ_AUTO_MAX_BYTES)
    ccfg = dataclasses.replace(calib_config(preset, cfg, device), hessians=cfg.gptq)
    t = time.perf_counter()
    calib = collect_calibration(model, preset, ccfg, capture=names, progress=say)
    seconds["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    # a8_budget 1: every layer W4A8 with the fp8 target's e4m3, nothing to rank
    space = cfg.a8_space() if cfg.a8_budget >= 1 else cfg.search_space()
    rank = 0 < cfg.a8_budget < 1
    convs = ([n for n in names if model.get_submodule(n).weight.dim() == 4]
             if cfg.a8_convs and cfg.a8_budget < 1 else [])
    choices = search_layers(model, calib, names, space, seed=cfg.seed, progress=say, workers=search_workers(),
                            keep_captures=rank or bool(convs) or cfg.gptq)
    apply_choices(model, choices)
    seconds["search"] = time.perf_counter() - t
    a8_info = None
    if cfg.a8_budget >= 1:
        a8_info = {"budget": cfg.a8_budget, "convs": cfg.a8_convs, "layers": list(names), "macs_share": 1.0}
    elif rank or convs:
        t = time.perf_counter()
        a8_info = {"budget": cfg.a8_budget, "convs": cfg.a8_convs}
        raised = list(convs)  # --a8-convs: every convolution; the budget ranks the other layers
        if rank:
            say(f"8-bit activations: measuring {len(names)} layers' activation costs")
            costs, macs = activation_costs(model, calib)
            raised += a8_layers({n: c for n, c in costs.items() if n not in convs}, macs, cfg.a8_budget)
            a8_info.update(costs=costs, macs=macs, macs_share=sum(macs[n] for n in raised) / sum(macs.values()))
        say(f"8-bit activations: {len(raised)} of {len(names)} layers")
        # the whole search again for them: the weights' scales are refined on the 8-bit inputs
        new = search_layers(model, calib, raised, cfg.a8_space(), seed=cfg.seed, workers=search_workers())
        for name, choice in new.items():
            apply_choice(model.get_submodule(name), choice)
        choices.update(new)
        seconds["a8"] = time.perf_counter() - t
        a8_info["layers"] = raised
    steps = preset.defaults(device).finetune_steps if cfg.finetune_steps is None else cfg.finetune_steps
    gptq_info = None
    if cfg.gptq:
        t = time.perf_counter()
        say("GPTQ weight rounding")
        # the fine-tuning teacher is the float model: it keeps the original weights
        gptq_info = gptq_layers(model, calib, keep_float=steps > 0, progress=say, workers=search_workers())
        seconds["gptq"] = time.perf_counter() - t
    calib.layers.clear()
    rows = layer_rows(model, choices)
    model.quantization = {"preset": preset.name, "scheme": cfg.scheme,
                          "base_config_hash": preset.config_hash(), "random_weights": random_weights,
                          **preset.checkpoint_fields()}

    evaluate = cfg.evaluate
    if evaluate is None:
        evaluate = sum(p.numel() for p in model.parameters()) < EVAL_AUTO_MAX_PARAMS
    metrics: dict = {}
    t = time.perf_counter()
    if evaluate:
        say("evaluating the quantized UNet on " + ("held-out" if calib.holdout else "calibration") + " samples")
        metrics.update({f"ptq_{k}": v for k, v in eval_metrics(model, calib).items()})
    seconds["evaluate"] = time.perf_counter() - t

    ft = None
    if steps > 0:
        say(f"TALoRA + DFA fine-tuning: {steps} steps, K={cfg.adapters}, rank {cfg.lora_rank}")
        before = {"dfa_loss": metrics["ptq_dfa_loss"]} if evaluate else None
        res = finetune(model, calib, steps, rank=cfg.lora_rank, num_adapters=cfg.adapters, lr=cfg.finetune_lr,
                       batch=cfg.finetune_batch, seed=cfg.seed, progress=say, before=before,
                       weighting=cfg.finetune_weighting, fresh_noise=cfg.finetune_fresh_noise)
        ft = dataclasses.asdict(res)
        ft.update({"rank": cfg.lora_rank, "adapters": cfg.adapters, "lr": cfg.finetune_lr,
                   "weighting": cfg.finetune_weighting, "fresh_noise": cfg.finetune_fresh_noise})
        seconds["finetune"] = res.seconds
        if evaluate:
            metrics.update({f"finetuned_{k}": v for k, v in eval_metrics(model, calib).items()})
    for _, layer in quant_layers(model):  # the teacher's weights, no longer needed
        layer.float_weight = None
    model.eval()

    report = QuantizeReport(
        preset=preset.name, scheme=cfg.scheme, config=dataclasses.asdict(cfg),
        base_config_hash=preset.config_hash(), random_weights=random_weights, layers=rows, kept_fp=kept,
        calibration={"samples": ccfg.samples, "steps": ccfg.steps, "resolution": ccfg.resolution,
                     "scheduler": ccfg.scheduler, "timesteps": calib.timesteps, "train": calib.train,
                     "holdout": calib.holdout, "max_tokens": ccfg.max_tokens,
                     "embeddings": ccfg.embeddings or "seeded random"},
        metrics=metrics, finetune=ft, a8=a8_info, gptq=gptq_info, seconds=seconds)
    report.seconds["total"] = time.perf_counter() - t0
    return model, report
