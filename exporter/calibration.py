"""Calibration data: UNet inputs along sampler trajectories, and per-layer input captures.

One pass does both. ``num_samples`` trajectories start from seeded Gaussian
latents and run in lockstep (one batch, one shared timestep per UNet call)
through a diffusers scheduler for ``num_steps`` steps with the full-precision
UNet. Every call is kept as a :class:`CalibRecord` (inputs, the FP noise
prediction, the step's denoising factor for DFA). While it runs, forward
pre-hooks on the layers to quantize record, over every token of the training
samples, per-input-channel min/max, and keep a seeded subsample of input rows
(tokens for Linear, interior im2col patches for Conv2d) for the format search,
and with ``hessians`` the input's X^T X over every token (GPTQ's Hessian).

Text conditioning comes from a ``.safetensors`` file of precomputed
embeddings (``encoder_hidden_states`` [N, L, D], ``text_embeds`` [N, P],
optional ``time_ids`` [N, 6]; sample i uses row i mod N) or, by default, seeded
standard-normal tensors of the right shapes. UNets without ``text_time`` added
conditioning (SD 1.x/2.x style) take only ``encoder_hidden_states``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UserError
from .gptq import keeps_hessian
from .models.presets import Preset, run_unet

SCHEDULERS = ("euler", "ddim")


@dataclass
class CalibConfig:
    """Sizes of the calibration run. ``holdout`` samples are kept out of the search and
    fine-tuning and used to measure them (default: a quarter of the samples)."""

    samples: int = 4
    steps: int = 8
    resolution: int = 128
    scheduler: str = "euler"
    seed: int = 0
    embeddings: str | None = None
    holdout: int | None = None
    max_tokens: int = 512
    hessians: bool = False  # also X^T X of each captured layer's input, for GPTQ (exporter.gptq)

    def __post_init__(self):
        for name in ("samples", "steps", "resolution", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"calibration {name} must be a positive integer, got {value!r}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        if self.holdout is None:
            self.holdout = self.samples // 4
        if not 0 <= self.holdout < self.samples:
            raise UserError(f"holdout ({self.holdout}) must leave at least one of {self.samples} samples")


@dataclass
class CalibRecord:
    """One UNet call: batch of all samples at one sampler step."""

    step: int
    timestep: float
    inputs: dict[str, torch.Tensor]  # flat UNet inputs (see Preset.model_inputs), batch = samples
    eps: torch.Tensor  # FP noise prediction [samples, C, h, w]
    dfa: float  # b_t: d x_next / d eps for this step (exporter.finetune.denoising_factors)


@dataclass
class LayerCapture:
    """What the search needs about one layer's input.

    rows: [n, K] float32, K = fan_in (im2col order C, kh, kw for convs);
    ch_min / ch_max: [C] per input channel over every training token; taps =
    kh * kw (1 for Linear), so column k belongs to channel k // taps.
    """

    kind: str  # "linear" | "conv"
    taps: int
    rows: list[torch.Tensor] = field(default_factory=list)
    ch_min: torch.Tensor | None = None
    ch_max: torch.Tensor | None = None
    tokens_seen: int = 0
    #: [K, K] float32: X^T X summed over every training token (all im2col patches, padding
    #: included), with CalibConfig.hessians and gptq.keeps_hessian(K); else None
    h: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        if isinstance(self.rows, list):
            self.rows = torch.cat(self.rows) if self.rows else torch.empty(0)
        return self.rows

    @property
    def x_min(self) -> float:
        return float(self.ch_min.min())

    @property
    def x_max(self) -> float:
        return float(self.ch_max.max())


@dataclass
class CalibrationData:
    records: list[CalibRecord]
    train: list[int]  # sample indices used by the search and fine-tuning
    holdout: list[int]  # sample indices kept for evaluation
    scheduler: str
    scheduler_config: dict
    layers: dict[str, LayerCapture] = field(default_factory=dict)

    @property
    def timesteps(self) -> list[float]:
        return [r.timestep for r in self.records]

    def eval_samples(self) -> list[int]:
        """Held-out samples, or the training ones when nothing was held out."""
        return self.holdout or self.train


def make_scheduler(kind: str, config: dict):
    """A diffusers scheduler ('euler' = EulerDiscreteScheduler, 'ddim' = DDIMScheduler, eta 0)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}[kind]
    return cls.from_config(config)


def text_conditioning(preset: Preset, n: int, path: str | None, seed: int, text_len: int | None = None):
    """(encoder_hidden_states [n, L, D], text_embeds [n, P], time_ids [n, 6]) from ``path`` or
    seeded N(0, 1); text_embeds is None for UNets without text_time, time_ids when not given."""
    cfg = preset.config()
    D, P, L = cfg["cross_attention_dim"], preset.text_embeds_dim, text_len or preset.text_len
    if path is None:  # one generator per sample: sample i is the same whatever n is
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (i + 1)) for i in range(n)]
        ehs = torch.stack([torch.randn(L, D, generator=g) for g in gens])
        pooled = None if P is None else torch.stack([torch.randn(P, generator=g) for g in gens])
        return ehs, pooled, None
    from safetensors.torch import load_file

    try:
        data = load_file(path)
    except Exception as err:
        raise UserError(f"--calib-embeddings {path}: not a readable safetensors file ({err})") from None
    needs = ["encoder_hidden_states"] + ([] if P is None else ["text_embeds"])
    if any(k not in data for k in needs):
        raise UserError(f"--calib-embeddings {path}: needs tensors 'encoder_hidden_states' [N, L, {D}]"
                        + ("" if P is None else f" and 'text_embeds' [N, {P}]") + f"; found {sorted(data)}")
    ehs = data["encoder_hidden_states"].float()
    if ehs.dim() != 3 or ehs.shape[0] < 1:
        raise UserError(f"--calib-embeddings {path}: encoder_hidden_states has shape {tuple(ehs.shape)}, "
                        f"expected [N, L, {D}]")
    if ehs.shape[-1] != D:
        raise UserError(f"--calib-embeddings {path}: encoder_hidden_states are {ehs.shape[-1]} wide but the "
                        f"UNet's cross_attention_dim is {D}; encode the prompts with this model's text encoder(s)")
    idx = torch.arange(n) % ehs.shape[0]
    if P is None:
        return ehs[idx], None, None
    pooled = data["text_embeds"].float()
    if pooled.dim() != 2 or pooled.shape[-1] != P or pooled.shape[0] != ehs.shape[0]:
        raise UserError(f"--calib-embeddings {path}: text_embeds has shape {tuple(pooled.shape)}, expected "
                        f"[{ehs.shape[0]}, {P}] (one pooled embedding per encoder_hidden_states row)")
    time_ids = data.get("time_ids")
    return ehs[idx], pooled[idx], (time_ids.float()[idx] if time_ids is not None else None)


def collect_calibration(model: nn.Module, preset: Preset, cfg: CalibConfig,
                        capture: list[str] | tuple[str, ...] = (),
                        progress: Callable[[str], None] | None = None) -> CalibrationData:
    """Run the FP ``model`` along ``cfg.samples`` seeded trajectories; capture ``capture`` layers.

    The model must be the full-precision UNet (layers named in ``capture`` are
    nn.Linear / nn.Conv2d). Returns records for every step plus captures.
    """
    from .finetune import denoising_factors

    device = next(model.parameters()).device
    sched = make_scheduler(cfg.scheduler, preset.scheduler)
    sched.set_timesteps(cfg.steps)
    dfa = denoising_factors(sched)
    S = cfg.samples
    h, w = preset._latent_hw(cfg.resolution, cfg.resolution)
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + i) for i in range(S)]
    latents = torch.stack([torch.randn(preset.latent_channels, h, w, generator=g) for g in gens])
    latents = latents * sched.init_noise_sigma
    ehs, pooled, time_ids = text_conditioning(preset, S, cfg.embeddings, cfg.seed)
    if time_ids is None:
        px = cfg.resolution
        time_ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32).repeat(S, 1)
    train = list(range(S - cfg.holdout))
    holdout = list(range(S - cfg.holdout, S))

    captures, handles = _install_capture(model, capture, train, S, cfg, len(sched.timesteps))
    records = []
    try:
        for i, t in enumerate(sched.timesteps):
            if progress:
                progress(f"calibration step {i + 1}/{len(sched.timesteps)} (t={float(t):.0f})")
            inputs = {
                "sample": sched.scale_model_input(latents, t).float(),
                "timestep": torch.tensor(float(t)),
                "encoder_hidden_states": ehs,
            }
            if pooled is not None:  # text_time (SDXL-style) added conditioning
                inputs.update(text_embeds=pooled, time_ids=time_ids)
            with torch.no_grad():
                eps = run_unet(model, {k: v.to(device) for k, v in inputs.items()}).float().cpu()
            records.append(CalibRecord(i, float(t), inputs, eps, dfa[i]))
            latents = sched.step(eps, t, latents).prev_sample
    finally:
        for hnd in handles:
            hnd.remove()
    return CalibrationData(records, train, holdout, cfg.scheduler, dict(preset.scheduler), captures)


def _install_capture(model: nn.Module, names, train: list[int], S: int, cfg: CalibConfig, calls: int):
    """Forward pre-hooks recording stats and a row subsample of each named layer's input."""
    per_call = max(1, math.ceil(cfg.max_tokens / calls))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    captures: dict[str, LayerCapture] = {}
    handles = []
    use = None if len(train) == S else torch.tensor(train)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Conv2d):
            cap = LayerCapture("conv", taps=layer.kernel_size[0] * layer.kernel_size[1])
        elif isinstance(layer, nn.Linear):
            cap = LayerCapture("linear", taps=1)
        else:
            raise TypeError(f"{name}: only nn.Linear and nn.Conv2d layers can be captured, "
                            f"got {type(layer).__name__}")
        fan_in = layer.weight[0].numel()
        if cfg.hessians and keeps_hessian(fan_in):
            cap.h = torch.zeros(fan_in, fan_in, device=layer.weight.device)
        captures[name] = cap
        handles.append(layer.register_forward_pre_hook(_capture_hook(cap, layer, use, S, per_call, gen)))
    return captures, handles


def _capture_hook(cap: LayerCapture, layer: nn.Module, use, S: int, per_call: int,
                  gen: torch.Generator):
    def hook(module, args):
        x = args[0].detach()
        if use is not None and x.shape[0] == S:  # every UNet layer input is batch-first
            x = x[use.to(x.device)]
        x = x.float()
        if cap.kind == "conv":
            lo, hi = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
            rows = conv_rows(x, layer, per_call, gen)
            cap.tokens_seen += x.shape[0] * x.shape[2] * x.shape[3]
        else:
            flat = x.reshape(-1, x.shape[-1])
            lo, hi = flat.amin(0), flat.amax(0)
            cap.tokens_seen += flat.shape[0]
            rows = flat
            if rows.shape[0] > per_call:
                rows = rows[torch.randperm(rows.shape[0], generator=gen)[:per_call].to(rows.device)]
        cap.ch_min = lo.cpu() if cap.ch_min is None else torch.minimum(cap.ch_min, lo.cpu())
        cap.ch_max = hi.cpu() if cap.ch_max is None else torch.maximum(cap.ch_max, hi.cpu())
        cap.rows.append(rows.cpu().clone())
        if cap.h is not None:
            if cap.kind == "conv":  # every patch the layer computes, one sample at a time (memory)
                for xb in x:
                    cols = F.unfold(xb[None], layer.kernel_size, layer.dilation, layer.padding, layer.stride)[0]
                    cap.h.addmm_(cols, cols.T)
            else:
                cap.h.addmm_(flat.T, flat)

    return hook


def conv_rows(x: torch.Tensor, conv: nn.Conv2d, max_rows: int | None = None,
              gen: torch.Generator | None = None) -> torch.Tensor:
    """im2col rows [n, C*kh*kw] (order C, kh, kw) of the patches that touch no padding.

    Interior patches only: the quantized layer quantizes x before padding, so
    padded zeros stay exact zeros; excluding them keeps row-wise quantization
    of these patches identical to the layer's own arithmetic. (A map too small
    to have any interior patch keeps all of them.) With ``max_rows``, a seeded
    random subset of at most that many patches is gathered directly, without
    materialising the whole im2col matrix. Rows are ordered batch, then
    output position (row-major), before subsampling.
    """
    if conv.groups != 1:
        raise ValueError("grouped convolutions are not supported by the calibration capture")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    B, C, H, W = x.shape
    out_h, out_w = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    top = torch.arange(out_h) * sh - ph  # first input row of each output row's window
    left = torch.arange(out_w) * sw - pw
    rows_ok = (top >= 0) & (top + dh * (kh - 1) <= H - 1)
    cols_ok = (left >= 0) & (left + dw * (kw - 1) <= W - 1)
    if not (rows_ok.any() and cols_ok.any()):
        rows_ok, cols_ok = torch.ones_like(rows_ok), torch.ones_like(cols_ok)
    oi, oj = rows_ok.nonzero()[:, 0], cols_ok.nonzero()[:, 0]
    pos = torch.stack(torch.meshgrid(torch.arange(B), oi, oj, indexing="ij"), -1).reshape(-1, 3)  # (b, i, j)
    if max_rows is not None and pos.shape[0] > max_rows:
        pos = pos[torch.randperm(pos.shape[0], generator=gen)[:max_rows]]
    xp = F.pad(x, (pw, pw, ph, ph))
    b, i, j = (pos[:, k].to(x.device) for k in range(3))
    ii = (i * sh)[:, None] + torch.arange(kh, device=x.device) * dh  # [P, kh] in padded coordinates
    jj = (j * sw)[:, None] + torch.arange(kw, device=x.device) * dw
    c = torch.arange(C, device=x.device)
    patches = xp[b[:, None, None, None], c[None, :, None, None], ii[:, None, :, None], jj[:, None, None, :]]
    return patches.reshape(pos.shape[0], C * kh * kw)
