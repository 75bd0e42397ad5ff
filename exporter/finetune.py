"""TALoRA + DFA fine-tuning of a quantized UNet (MSFP, arXiv 2505.21591, sections TALoRA and DFA).

TALoRA: every quantized layer gets K LoRA adapters (``exporter.lora.TALoRA``)
sharing one :class:`~exporter.lora.AdapterSelection`. A
:class:`~exporter.lora.TimestepRouter` (small MLP) reads the UNet's timestep
embedding (a forward hook on ``unet.time_embedding``) and picks one adapter
per UNet call, hard in the forward pass and soft in the backward pass
(straight-through estimator). The router starts out splitting the timestep
range into K equal intervals (a short cross-entropy warm-up) so every adapter
gets data; fine-tuning then moves the boundaries where the loss wants them.

After training the choice is frozen into a table over every integer
timestep 0..T-1 (``unet.talora.table``, int64 [T]); at inference a forward
pre-hook on the UNet reads its ``timestep`` argument and selects
``table[clamp(round(t), 0, T-1)]`` (round half to even). All samples of a
batch must share one timestep. :func:`adapter_for_timestep` is the same lookup.

DFA: for a deterministic first-order sampler the next latent is affine in the
noise prediction, x_next = a_t x_t + b_t eps, so an error d_eps in the
prediction moves the next latent by b_t d_eps. The loss is therefore
``w_t * mean((eps_q - eps_fp)^2)`` with ``w_t = b_t^2`` (normalised to mean 1
over the schedule). :func:`denoising_factors` derives b_t from the
scheduler; docs/quantization.md has the derivation.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UserError
from .layers import quant_layers
from .lora import AdapterSelection, TALoRA, TimestepRouter


# ---- DFA ------------------------------------------------------------------------
def denoising_factors(scheduler) -> list[float]:
    """b_t for each step of ``scheduler`` (after ``set_timesteps``): d x_next / d eps.

    EulerDiscreteScheduler (epsilon prediction, no churn): x_next = x + (sigma_next
    - sigma) * eps, so b = sigma_next - sigma. DDIMScheduler (eta 0): x_prev =
    sqrt(abar_prev) * (x - sqrt(1 - abar) eps) / sqrt(abar) + sqrt(1 - abar_prev) eps,
    so b = sqrt(1 - abar_prev) - sqrt(abar_prev) * sqrt(1 - abar) / sqrt(abar).
    """
    name = type(scheduler).__name__
    pred = scheduler.config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise UserError(f"DFA weights are derived for epsilon prediction; {name} predicts {pred}")
    if name == "EulerDiscreteScheduler":
        sig = scheduler.sigmas.double()
        return [float(sig[i + 1] - sig[i]) for i in range(len(scheduler.timesteps))]
    if name == "DDIMScheduler":
        ac = scheduler.alphas_cumprod.double()
        step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        out = []
        for t in scheduler.timesteps.tolist():
            prev = t - step
            a_t = ac[t]
            a_prev = ac[prev] if prev >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod)).double()
            out.append(float((1 - a_prev).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()))
        return out
    raise UserError(f"no DFA derivation for {name}; use the euler or ddim scheduler")


def dfa_weights(factors: list[float]) -> list[float]:
    """b_t^2 normalised to mean 1 (Adam is scale-free; this keeps loss values readable)."""
    sq = [f * f for f in factors]
    mean = sum(sq) / len(sq)
    return [s / mean if mean > 0 else 1.0 for s in sq]


# ---- TALoRA ---------------------------------------------------------------------
class TALoRAController(nn.Module):
    """Router, shared adapter selection and frozen table of a TALoRA UNet (``unet.talora``).

    ``table``: int64 [num_train_timesteps], the adapter for each integer
    timestep (valid once ``frozen``). ``frozen`` is mirrored in the buffer
    ``is_frozen`` so it survives ``state_dict``.
    """

    def __init__(self, num_adapters: int, embed_dim: int, num_train_timesteps: int = 1000, hidden: int = 64):
        super().__init__()
        self.selection = AdapterSelection(num_adapters)
        self.router = TimestepRouter(embed_dim, self.selection, hidden)
        self.register_buffer("table", torch.zeros(num_train_timesteps, dtype=torch.int64))
        self.register_buffer("is_frozen", torch.tensor(False))
        self._handles: list = []

    @property
    def num_adapters(self) -> int:
        return self.selection.num_adapters

    @property
    def frozen(self) -> bool:
        return bool(self.is_frozen)

    def adapter_for_timestep(self, t) -> int:
        """The frozen table's adapter for timestep ``t`` (nearest integer timestep)."""
        if not self.frozen:
            raise RuntimeError("TALoRA router is not frozen yet: call freeze_router() after fine-tuning")
        idx = int(torch.as_tensor(float(t)).round().clamp(0, self.table.numel() - 1))
        return int(self.table[idx])

    def attach(self, unet: nn.Module) -> None:
        """Install the hooks: router on the timestep embedding, table lookup before each call."""
        self.detach()
        self._handles = [
            unet.time_embedding.register_forward_hook(self._route),
            unet.register_forward_pre_hook(self._lookup, with_kwargs=True),
        ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _route(self, module, args, emb):
        if not self.frozen:
            self.router(emb)

    def _lookup(self, module, args, kwargs):
        if not self.frozen:
            return None
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        t = torch.as_tensor(t).flatten()
        if t.numel() == 0:
            raise ValueError("TALoRA UNet called without a timestep")
        if t.numel() > 1 and not bool((t == t[0]).all()):
            raise ValueError(f"TALoRA: all samples in a batch must share one timestep (the adapter is "
                             f"chosen per call); got {t.tolist()}")
        self.selection.select(self.adapter_for_timestep(t[0]))
        return None


def timestep_embeddings(unet: nn.Module, timesteps: torch.Tensor) -> torch.Tensor:
    """The UNet's timestep embedding (time_proj -> time_embedding) for each timestep: [T, D]."""
    with torch.no_grad():
        t_emb = unet.time_proj(timesteps.to(next(unet.parameters()).device)).float()
        return unet.time_embedding(t_emb).float()


def adapted_layers(unet: nn.Module):
    """The quantized layers that get TALoRA adapters: all but NVFP4 ones (``a_quant.mode ==
    "nvfp4"``), whose FP4 weight must be one constant for Blackwell's FP4 GEMM, while TALoRA
    selects weight codes per timestep."""
    return [(n, l) for n, l in quant_layers(unet) if l.a_quant.mode != "nvfp4"]


def add_talora(unet: nn.Module, rank: int = 4, num_adapters: int = 4, scale: float = 1.0,
               hidden: int = 64, num_train_timesteps: int = 1000, seed: int = 0) -> TALoRAController:
    """Attach K TALoRA adapters of rank ``rank`` to every :func:`adapted_layers` layer and a router.

    Returns the controller (also ``unet.talora``); adapters start at zero
    (B = 0), so the model is unchanged until trained.
    """
    if not isinstance(rank, int) or rank < 1:
        raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not isinstance(num_adapters, int) or num_adapters < 1:
        raise UserError(f"TALoRA adapter count K must be a positive integer, got {num_adapters!r}")
    embed_dim = unet.time_embedding.linear_2.out_features
    device = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[]):  # seeded adapter and router initialisation
        torch.manual_seed(seed)
        ctrl = TALoRAController(num_adapters, embed_dim, num_train_timesteps, hidden)
        for _, layer in adapted_layers(unet):
            layer.add_lora(TALoRA(layer.fan_in, layer.weight.shape[0], rank, ctrl.selection, scale).to(device))
    unet.talora = ctrl.to(device)
    ctrl.attach(unet)
    return ctrl


def init_router_intervals(unet: nn.Module, ctrl: TALoRAController, steps: int = 200, lr: float = 1e-2,
                          seed: int = 0) -> None:
    """Warm-start the router so adapter k covers timesteps [k T / K, (k + 1) T / K)."""
    T, K = ctrl.table.numel(), ctrl.num_adapters
    ts = torch.arange(T, dtype=torch.float32)
    emb = timestep_embeddings(unet, ts)
    labels = (torch.arange(T) * K // T).to(emb.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        opt = torch.optim.Adam(ctrl.router.net.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.cross_entropy(ctrl.router.net(emb), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()


def freeze_router(unet: nn.Module) -> torch.Tensor:
    """Freeze the router's choice into ``unet.talora.table`` for every integer timestep."""
    ctrl: TALoRAController = unet.talora
    ts = torch.arange(ctrl.table.numel(), dtype=torch.float32)
    with torch.no_grad():
        logits = ctrl.router.net(timestep_embeddings(unet, ts))
        ctrl.table.copy_(logits.argmax(-1).to(ctrl.table.device))
        ctrl.is_frozen.fill_(True)
    return ctrl.table


def adapter_for_timestep(model: nn.Module, t) -> int:
    """The TALoRA adapter a quantized UNet uses at timestep ``t`` (0 without TALoRA)."""
    ctrl = getattr(model, "talora", None)
    return 0 if ctrl is None else ctrl.adapter_for_timestep(t)


def table_runs(table: torch.Tensor) -> list[dict]:
    """Compact form of the table: [{"from": t0, "to": t1, "adapter": k}, ...] (inclusive)."""
    runs, start = [], 0
    vals = table.tolist()
    for i in range(1, len(vals) + 1):
        if i == len(vals) or vals[i] != vals[start]:
            runs.append({"from": start, "to": i - 1, "adapter": vals[start]})
            start = i
    return runs


# ---- training --------------------------------------------------------------------
@dataclass
class FinetuneResult:
    steps: int
    seconds: float
    loss_first: float
    loss_last: float
    heldout_before: float  # DFA loss on the held-out samples (training samples when none)
    heldout_after: float
    table_runs: list


def eval_metrics(unet: nn.Module, calib) -> dict:
    """Noise-prediction SQNR (dB) and mean DFA loss of ``unet`` vs the FP predictions, over every
    calibration record, on the held-out samples (the training ones when none were held out)."""
    from .models.presets import run_unet

    weights = dfa_weights([r.dfa for r in calib.records])
    idx = torch.tensor(calib.eval_samples())
    device = next(unet.parameters()).device
    sig = err = dfa = 0.0
    with torch.no_grad():
        for r in calib.records:
            inputs = {k: (v[idx] if v.dim() > 0 else v).to(device) for k, v in r.inputs.items()}
            eps = run_unet(unet, inputs).float().cpu()
            ref = r.eps[idx]
            e = float((eps - ref).pow(2).sum())
            sig, err = sig + float(ref.pow(2).sum()), err + e
            dfa += weights[r.step] * e / ref.numel()
    return {"eps_sqnr_db": 10 * math.log10(sig / err) if err > 0 else float("inf"),
            "dfa_loss": dfa / len(calib.records)}


@contextlib.contextmanager
def float_model(unet: nn.Module):
    """The quantized UNet as its float original: quantizers off, LoRAs detached, and the original
    weights where GPTQ rounded them (``float_weight``) (the teacher)."""
    layers = [m for _, m in quant_layers(unet)]
    saved = [(m.lora, m.w_quant.enabled, m.a_quant.enabled, m.weight.data) for m in layers]
    for m in layers:
        m.lora, m.w_quant.enabled, m.a_quant.enabled = None, False, False
        if m.float_weight is not None:
            m.weight.data = m.float_weight
    try:
        yield unet
    finally:
        for m, (lora, w, a, data) in zip(layers, saved):
            m.lora, m.w_quant.enabled, m.a_quant.enabled = lora, w, a
            m.weight.data = data


#: how fine-tuning weights the calibration records' timesteps: "dfa" (b_t^2, the next latent's
#: error) or "uniform" (the noise prediction's own error at every step)
WEIGHTINGS = ("dfa", "uniform")


def record_weights(calib, weighting: str) -> list[float]:
    """The weight of each calibration record in the fine-tuning loss (:data:`WEIGHTINGS`).

    With Euler's 8 steps on SDXL's schedule DFA gives the first step (t = 876) 73 % of the weight
    and every step below t = 500 together 2.5 %: the adapters then barely see the low-noise steps,
    where the noise prediction's own error is largest (docs/quantization.md, 'Quality on a
    trained model')."""
    if weighting not in WEIGHTINGS:
        raise UserError(f"fine-tuning weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if weighting == "uniform":
        return [1.0] * len(calib.records)
    return dfa_weights([r.dfa for r in calib.records])


def finetune(unet: nn.Module, calib, steps: int, rank: int = 4, num_adapters: int = 4, lr: float = 5e-4,
             batch: int = 4, seed: int = 0, progress: Callable[[str], None] | None = None,
             before: dict | None = None, weighting: str = "uniform", fresh_noise: bool = True) -> FinetuneResult:
    """TALoRA + DFA fine-tuning of a quantized UNet on calibration records, then freeze the router.

    Only the adapters and the router train (Adam); base weights and quantizer
    parameters stay fixed. ``fresh_noise``: each step noises the FP sampler's clean latents
    (from its last calibration step) with fresh noise at a uniformly drawn timestep and the
    target is the float model's prediction there (:func:`float_model`, one forward without
    gradient), so the adapters see a new input every step instead of the same 8 timesteps
    x samples; the record drawn (``weighting``) then supplies only the conditioning. Without
    it the targets are the FP noise predictions stored in the records. The held-out DFA loss
    is measured before and after (``before``: :func:`eval_metrics` already taken).
    """
    from .models.presets import run_unet

    if steps < 0:
        raise UserError(f"--finetune-steps must be >= 0, got {steps}")
    weights = record_weights(calib, weighting)  # checked before anything is attached
    start = time.perf_counter()
    ctrl = add_talora(unet, rank, num_adapters, seed=seed,
                      num_train_timesteps=calib.scheduler_config.get("num_train_timesteps", 1000))
    init_router_intervals(unet, ctrl, seed=seed)
    for p in unet.parameters():
        p.requires_grad_(False)
    params = [p for _, layer in adapted_layers(unet) for p in layer.lora.parameters()]
    params += list(ctrl.router.parameters())
    for p in params:
        p.requires_grad_(True)
    before = (before or eval_metrics(unet, calib))["dfa_loss"]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    first = last = float("nan")
    # records drawn with probability w_t / sum(w) and an unweighted MSE: the same expected gradient
    # as the DFA-weighted loss over the schedule, with far less variance (w spans decades)
    probs = torch.tensor([weights[r.step] for r in calib.records], dtype=torch.float64)
    if fresh_noise:  # the FP sampler's clean latents from its last step (the inputs are x = sqrt(a) x0 + sqrt(1-a) eps)
        from .calibration import make_scheduler

        ac = make_scheduler(calib.scheduler, calib.scheduler_config).alphas_cumprod.double()
        end = calib.records[-1]
        a = ac[int(round(end.timestep))]
        x0 = ((end.inputs["sample"].double() - (1 - a).sqrt() * end.eps.double()) / a.sqrt()).float()
    for step in range(steps):
        rec = calib.records[int(torch.multinomial(probs, 1, generator=gen))]
        pick = torch.tensor(calib.train)[torch.randperm(len(calib.train), generator=gen)[:batch]]
        inputs = {k: (v[pick] if v.dim() > 0 else v).to(device) for k, v in rec.inputs.items()}
        if fresh_noise:
            t = int(torch.randint(0, len(ac), (), generator=gen))
            noise = torch.randn(x0[pick].shape, generator=gen)
            inputs["sample"] = (ac[t].sqrt() * x0[pick] + (1 - ac[t]).sqrt() * noise).float().to(device)
            inputs["timestep"] = torch.tensor(float(t))
            with torch.no_grad(), float_model(unet):
                target = run_unet(unet, inputs).float()
        else:
            target = rec.eps[pick].to(device)
        eps = run_unet(unet, inputs).float()
        loss = F.mse_loss(eps, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        last = float(loss.detach())
        first = last if step == 0 else first
        if progress and (step + 1) % max(1, steps // 10) == 0:
            progress(f"fine-tune step {step + 1}/{steps}  loss {last:.4g}")
    for p in params:
        p.requires_grad_(False)
    table = freeze_router(unet)
    after = eval_metrics(unet, calib)["dfa_loss"]
    return FinetuneResult(steps, time.perf_counter() - start, first, last, before, after, table_runs(table))
