"""Train a small SDXL-style UNet on a procedural dataset, so quantization quality is measured on a
model that has learned something (random weights make eps-MSE ratios meaningless).

    PYTHONPATH=. .venv/bin/python benchmarks/train_tiny_unet.py [--out models/tiny-trained]
                                                               [--steps 800] [--batch 32] [--seed 0]

Data: 16x16x4 "latents" of 10 classes (stripes, gradients, rings, checkers, blobs ...), each
sample drawn from its class with a seeded random phase / position / amplitude, scaled to about
unit variance like SDXL's scaled VAE latents. Conditioning: a fixed seeded embedding per class
(encoder_hidden_states [L, D] and pooled text_embeds [P]); time_ids of a 128 px image. Objective:
DDPM epsilon prediction with SDXL's training noise schedule (exporter.models.presets.SDXL_SCHEDULER:
scaled_linear betas 0.00085 .. 0.012 over 1000 steps), t uniform in [0, 1000).

Writes (atomically, the folder replaced only when complete):
  OUT/unet/                      diffusers save_pretrained
  OUT/model_index.json, OUT/scheduler/scheduler_config.json
  OUT/calib_embeddings.safetensors   encoder_hidden_states [10, L, D], text_embeds [10, P], time_ids [10, 6]
                                     (the format exporter.calibration.text_conditioning reads; row = class)
  OUT/heldout.safetensors        x0 [N, 4, 16, 16], labels [N], noise [T, N, 4, 16, 16], timesteps [T]
                                 (samples and noise never seen in training, for bench_quality.py)
  OUT/train_log.json             loss curve, seconds, parameter count
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from exporter.models.presets import SDXL_SCHEDULER  # noqa: E402

NUM_CLASSES = 10
TEXT_LEN, TEXT_DIM, POOLED_DIM, TIME_EMBED_DIM = 8, 32, 32, 8
HELDOUT_TIMESTEPS = (100, 300, 500, 700, 900)
RESOLUTION_PX = 128  # 16x16 latents


def unet_config() -> dict:
    """About 1 M parameters; text_time added conditioning and linear projections like SDXL."""
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM)


def make_latents(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[N] class labels -> [N, 4, 16, 16] float32 latents, each a seeded random instance of its class."""
    n = labels.numel()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    out = torch.empty(n, 4, 16, 16)
    for i, c in enumerate(labels.tolist()):
        r = torch.rand(8, generator=gen)
        phase, amp, cx, cy = r[0] * 2 * math.pi, 0.7 + 0.6 * r[1], r[2] - 0.5, r[3] - 0.5
        freq = 2 + 2 * r[4]
        if c == 0:    # horizontal stripes
            base = torch.sin(freq * math.pi * yy + phase)
        elif c == 1:  # vertical stripes
            base = torch.sin(freq * math.pi * xx + phase)
        elif c == 2:  # diagonal stripes
            base = torch.sin(freq * math.pi * (xx + yy) / 1.4 + phase)
        elif c == 3:  # linear gradient, random direction
            base = torch.cos(phase) * xx + torch.sin(phase) * yy
        elif c == 4:  # rings around a random centre
            base = torch.cos(freq * math.pi * ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() + phase)
        elif c == 5:  # checkerboard
            base = torch.sign(torch.sin(freq * math.pi * xx + phase) * torch.sin(freq * math.pi * yy + phase))
        elif c == 6:  # gaussian blob
            base = 2 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.15) - 0.5
        elif c == 7:  # square
            base = torch.where(((xx - cx).abs() < 0.4) & ((yy - cy).abs() < 0.4), 1.0, -0.6)
        elif c == 8:  # radial gradient
            base = 1.5 - 1.5 * ((xx - cx) ** 2 + (yy - cy) ** 2).sqrt()
        else:         # cross
            base = torch.where(((xx - cx).abs() < 0.15) | ((yy - cy).abs() < 0.15), 1.2, -0.5)
        # the four channels: the pattern, its negative shifted, a class-dependent constant, a blend
        mix = torch.stack([base, -0.6 * base.roll(2, 1), torch.full_like(base, (c - 4.5) / 4.5),
                           0.5 * base * yy + 0.3 * xx])
        out[i] = amp * mix + 0.05 * torch.randn(4, 16, 16, generator=gen)
    return out


def class_conditioning(seed: int) -> dict[str, torch.Tensor]:
    """Fixed per-class embeddings (like a frozen text encoder's output for 10 prompts)."""
    g = torch.Generator().manual_seed(seed * 7 + 12345)
    ehs = torch.randn(NUM_CLASSES, TEXT_LEN, TEXT_DIM, generator=g)
    pooled = torch.randn(NUM_CLASSES, POOLED_DIM, generator=g)
    px = float(RESOLUTION_PX)
    time_ids = torch.tensor([[px, px, 0.0, 0.0, px, px]]).repeat(NUM_CLASSES, 1)
    return {"encoder_hidden_states": ehs, "text_embeds": pooled, "time_ids": time_ids}


def alphas_cumprod() -> torch.Tensor:
    """SDXL's training schedule: scaled_linear betas (sqrt-space linear), float64 -> [1000]."""
    s = SDXL_SCHEDULER
    betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, s["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    a = ac[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def unet_forward(unet, x, t, cond, labels):
    return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"][labels],
                added_cond_kwargs={"text_embeds": cond["text_embeds"][labels],
                                   "time_ids": cond["time_ids"][labels]}, return_dict=False)[0]


def train(steps: int, batch: int, seed: int, lr: float = 2e-3, log=print):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config())
    cond = class_conditioning(seed)
    ac = alphas_cumprod()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses, t0 = [], time.perf_counter()
    unet.train()
    for step in range(steps):
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
        x0 = make_latents(labels, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet_forward(unet, add_noise(x0, noise, t, ac), t, cond, labels), noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, steps // 10) == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"step {step + 1}/{steps}  loss(avg 50) {recent:.4f}  {time.perf_counter() - t0:.0f}s")
    unet.eval()
    return unet, cond, losses, time.perf_counter() - t0


def heldout_set(seed: int, n: int) -> dict[str, torch.Tensor]:
    """Samples and noise from generators the training never uses."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + 99991)
    labels = torch.arange(n) % NUM_CLASSES
    x0 = make_latents(labels, g)
    ts = torch.tensor(HELDOUT_TIMESTEPS)
    noise = torch.randn(len(ts), *x0.shape, generator=g)
    return {"x0": x0, "labels": labels, "noise": noise, "timesteps": ts}


def save_folder(out: Path, unet, cond, held, log_info: dict) -> None:
    """Write everything into a temporary sibling folder, then swap it into place."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".partial-{out.name}."))
    try:
        unet.save_pretrained(tmp / "unet")
        (tmp / "model_index.json").write_text(json.dumps(
            {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}, indent=1))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "EulerDiscreteScheduler", **SDXL_SCHEDULER}, indent=1))
        save_file({k: v.contiguous() for k, v in cond.items()}, tmp / "calib_embeddings.safetensors")
        save_file({k: v.contiguous() for k, v in held.items()}, tmp / "heldout.safetensors")
        (tmp / "train_log.json").write_text(json.dumps(log_info, indent=1))
        old = out.with_name(f".partial-{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/tiny-trained")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=20, help="held-out samples (2 per class by default)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    unet, cond, losses, seconds = train(args.steps, args.batch, args.seed, args.lr)
    held = heldout_set(args.seed, args.heldout)
    params = sum(p.numel() for p in unet.parameters())
    info = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "seconds": seconds,
            "parameters": params, "loss_first50": sum(losses[:50]) / len(losses[:50]),
            "loss_last50": sum(losses[-50:]) / len(losses[-50:]), "command": " ".join(sys.argv)}
    save_folder(Path(args.out), unet, cond, held, info)
    print(f"saved {args.out}: {params / 1e6:.2f} M parameters, loss {info['loss_first50']:.3f} -> "
          f"{info['loss_last50']:.3f}, {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
