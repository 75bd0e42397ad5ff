"""`export-engine quantize MODEL --w4a4 ...`: the quantize stage on its own.

Writes ``OUT/quantized.safetensors`` + ``OUT/quantized.json`` (the quantized
checkpoint, see exporter.checkpoint) and ``OUT/quantize_report.json`` (per-layer
formats, bits and SQNR, calibration, metrics, timings). OUT defaults to
``models/<MODEL>-<scheme>``.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .cli import EXIT_OK, UserError


NVFP4_HELP = ("Blackwell: quantize Linear layers the NVFP4 way (signed e2m1 weights at 4 bits, e2m1 "
              "activations in blocks of 16 with FP8 block scales, no TALoRA) so the native target runs "
              "them as FP4 GEMMs; convolutions keep MSFP")
SHORTCUTS_HELP = ("keep the last up block's skip shortcuts (conv_shortcut) in higher precision (default; "
                  "--no-keep-fp-shortcuts quantizes them): on a trained UNet they carry ~40%% of the W4A4 loss "
                  "for <1%% of the FLOPs (docs/quantization.md, 'Quality on a trained model')")
A8_BUDGET_HELP = ("w4a4: give 8-bit e4m3 activations to the layers whose 4-bit activations cost the most eps "
                  "error per MAC, until this share of the quantized layers' MACs (0..1; default 0, 1 = W4A8 "
                  "everywhere). Free in speed on the fp8 target (Ada/Hopper runs W4A4 layers as FP8 GEMMs "
                  "anyway); docs/quantization.md, 'Quality on a trained model'")
A8_CONVS_HELP = ("w4a4: 8-bit e4m3 activations for every convolution. Free in speed on every target: none "
                 "runs a convolution on FP4 hardware (fp8 and native: FP8 GEMMs; plugin: decoded, fp16/fp32). "
                 "On a trained UNet eps ratio 1.171 vs 1.295 (with --nvfp4: 1.118 vs 1.233); "
                 "docs/quantization.md")
GPTQ_HELP = ("GPTQ weight rounding: each weight's rounding error is compensated by the weights not yet "
             "rounded, on the calibration inputs' Hessian (same formats and scales; layers with fan-in "
             "<= 4096). Default: on when the Hessians take <= 2 GiB (tiny and small UNets; SDXL needs "
             "6 GB, so off unless --gptq); docs/quantization.md")
WEIGHTING_HELP = ("timesteps' weights in the fine-tuning loss: uniform (the noise prediction's error at every "
                  "step; default) or dfa (b_t^2, the next latent's error, MSFP's DFA: most steps then go to the "
                  "noisiest timestep); docs/quantization.md")
THREADS_HELP = ("torch CPU threads for calibration and fine-tuning math (default 1). The checkpoint depends "
                "on this number and not on the machine; layer searches use every core either way")


CALIB_EMBEDDINGS_HELP = (".safetensors of your prompts' text embeddings: encoder_hidden_states [N,L,D] "
                         "(D = cross_attention_dim) and, for text_time UNets, text_embeds [N,P] "
                         "(README: own weights; default: seeded random)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quantize", prog="export-engine quantize", help="MSFP-quantize a UNet (calibrate, search formats, fine-tune) into a checkpoint",
        description="Quantize a diffusion UNet with MSFP mixup-sign FP4 formats, MPQ-DM mixed precision "
                    "and optional TALoRA + DFA fine-tuning; writes a quantized checkpoint.")
    p.add_argument("model", metavar="MODEL", help="model preset (see `export-engine list`): sdxl, sdxl-tiny")
    scheme = p.add_mutually_exclusive_group(required=True)
    for s, what in (("w4a4", "4-bit FP weights and activations"),
                    ("w4a8", "4-bit FP weights, 8-bit FP activations"),
                    ("w4a16", "4-bit FP weights, activations not quantized")):
        scheme.add_argument(f"--{s}", dest="scheme", action="store_const", const=s, help=what)
    p.add_argument("--model-path", metavar="P",
                   help="diffusers folder (with unet/) or single-file .safetensors; "
                        "default: seeded random weights")
    p.add_argument("--out", metavar="DIR", help="output folder (default models/<MODEL>-<scheme>)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-samples", type=int, metavar="N",
                   help="sampler trajectories (default: preset, per device)")
    g.add_argument("--calib-steps", type=int, metavar="N", help="sampler steps per trajectory")
    g.add_argument("--calib-resolution", type=int, metavar="PX", help="image size in pixels (latent = PX/8)")
    g.add_argument("--calib-embeddings", metavar="FILE", help=CALIB_EMBEDDINGS_HELP)
    g.add_argument("--scheduler", choices=("euler", "ddim"), default="euler", help="sampler for the trajectories")
    g = p.add_argument_group("search")
    g.add_argument("--include", metavar="REGEX", help="quantize only layers whose name matches")
    g.add_argument("--exclude", metavar="REGEX",
                   help="keep matching layers in higher precision (replaces the preset default "
                        "'^(conv_in|conv_out|time_embedding\\.|add_embedding\\.)'; '' keeps none)")
    g.add_argument("--keep-fp-shortcuts", action=argparse.BooleanOptionalAction, default=True,
                   help=SHORTCUTS_HELP)
    g.add_argument("--a8-budget", type=float, default=0.0, metavar="F", help=A8_BUDGET_HELP)
    g.add_argument("--a8-convs", action="store_true", help=A8_CONVS_HELP)
    g.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None, help=GPTQ_HELP)
    g.add_argument("--act-mode", choices=("static", "dynamic"), default="static",
                   help="activation scales: calibrated per tensor, or per token at run time (Linear layers)")
    g.add_argument("--search", choices=("pruned", "exhaustive"), default="pruned",
                   help="pruned: proxy then refine the best few (default); "
                        "exhaustive: every candidate by output MSE")
    g.add_argument("--no-mixup", dest="mixup", action="store_false",
                   help="signed formats only (no unsigned FP for AALs)")
    g.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false",
                   help="no MPQ-DM smoothing and per-channel N-1/N/N+1 bits")
    g.add_argument("--nvfp4", action="store_true", help=NVFP4_HELP)
    g = p.add_argument_group("fine-tuning (TALoRA + DFA)")
    g.add_argument("--finetune-steps", type=int, metavar="N", help="0 = PTQ only (default: preset, per device)")
    g.add_argument("--lora-rank", type=int, default=4, metavar="R", help="rank of each TALoRA adapter (default 4)")
    g.add_argument("--adapters", type=int, default=4, metavar="K", help="TALoRA adapters per layer (default 4)")
    g.add_argument("--finetune-fresh-noise", action=argparse.BooleanOptionalAction, default=True,
                   help="targets: the float model on the calibration's clean latents noised afresh at a random "
                        "timestep each step (default), or (--no-...) the stored calibration predictions")
    g.add_argument("--finetune-weighting", choices=("dfa", "uniform"), default="uniform", help=WEIGHTING_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed for random weights, latents and embeddings")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="print only the checkpoint path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .atomic import atomic_write_json, check_writable_dir
    from .checkpoint import save_checkpoint
    from .models import get_preset
    from .quantize import QuantizeConfig, quantize_model

    preset = get_preset(args.model)
    cfg = QuantizeConfig(
        scheme=args.scheme, calib_samples=args.calib_samples, calib_steps=args.calib_steps,
        resolution=args.calib_resolution, scheduler=args.scheduler, calib_embeddings=args.calib_embeddings,
        finetune_steps=args.finetune_steps, lora_rank=args.lora_rank, adapters=args.adapters,
        finetune_weighting=args.finetune_weighting, finetune_fresh_noise=args.finetune_fresh_noise,
        include=args.include, exclude=args.exclude, act_mode=args.act_mode, search=args.search,
        mixup=args.mixup, mixed_precision=args.mixed_precision, nvfp4=args.nvfp4, seed=args.seed,
        keep_fp_shortcuts=args.keep_fp_shortcuts, a8_budget=args.a8_budget, a8_convs=args.a8_convs,
        gptq=args.gptq,
        device=args.device, threads=args.threads)
    cfg.validate()  # bad options fail before anything is built or written
    if args.model_path and not Path(args.model_path).exists():
        raise UserError(f"--model-path {args.model_path}: no such file or directory")
    out = Path(args.out or Path("models") / f"{preset.name}-{args.scheme}")
    try:
        check_writable_dir(out)
    except PermissionError as err:
        from .cli import EXIT_OUTPUT

        raise UserError(str(err), EXIT_OUTPUT) from None
    start = time.perf_counter()

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"export-engine: warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning
        model, report = quantize_model(preset, cfg, model_path=args.model_path, progress=progress)
    progress(f"writing the checkpoint to {out}")
    path = save_checkpoint(model, out, report)
    atomic_write_json(out / "quantize_report.json", report.to_dict())
    if not args.quiet:
        print(report.summary())
        print(f"checkpoint: {path} (+ {path.with_suffix('.safetensors').name}), "
              f"report: {out / 'quantize_report.json'}")
    else:
        print(path)
    return EXIT_OK
