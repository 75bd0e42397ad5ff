"""CLI of the main job (`export-engine MODEL --w4a4 ...`), `build OUT` and `verify OUT`."""
from __future__ import annotations

import argparse

from .cli import EXIT_OK, EXIT_TOLERANCE, UserError
from .pipeline import TARGETS
from .quantize_cli import (A8_BUDGET_HELP, A8_CONVS_HELP, CALIB_EMBEDDINGS_HELP, GPTQ_HELP, NVFP4_HELP,
                           SHORTCUTS_HELP, THREADS_HELP)

MAIN = "run"  # `export-engine MODEL ...` is parsed as `export-engine run MODEL ...`

EPILOG = """examples:
  export-engine sdxl --w4a4                         SDXL (seeded random weights) -> engine
  export-engine sdxl --w4a4 --model-path ./sdxl-base-1.0     your weights (folder with unet/ or .safetensors)
  export-engine sdxl --w4a4 --lora style.safetensors:0.8     fold a LoRA into the quantized model
  export-engine unet --w4a4 --model-path ./my-unet --calib-embeddings prompts.safetensors
                                                    any diffusers UNet2DConditionModel folder
  export-engine sdxl-tiny --w4a4 --no-build && export-engine verify models/sdxl-tiny-w4a4
exit codes: 0 ok, 2 usage, 3 bad input, 4 output not writable, 5 TensorRT missing, 6 over tolerance
"""


def _triple(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not parts[0] <= parts[1] <= parts[2] or parts[0] < 1:
        raise argparse.ArgumentTypeError(f"expected N or MIN:OPT:MAX with MIN <= OPT <= MAX, got {text!r}")
    return tuple(parts)


def register(sub) -> None:
    p = sub.add_parser(MAIN, help="the whole pipeline: `export-engine MODEL --w4a4 [...]`",
                       description="Quantize MODEL (MSFP W4A4), export ONNX, run the graph passes, "
                                   "build a TensorRT engine and verify it against PyTorch. Every "
                                   "stage is cached in the out dir.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model preset: sdxl, sdxl-tiny, or unet for any UNet "
                   "folder given with --model-path (`export-engine list`)")
    scheme = p.add_mutually_exclusive_group()
    for s, what in (("w4a4", "4-bit FP weights and activations (default)"),
                    ("w4a8", "4-bit weights, 8-bit FP activations"), ("w4a16", "4-bit weights only")):
        scheme.add_argument(f"--{s}", dest="scheme", action="store_const", const=s, help=what)
    p.add_argument("--model-path", metavar="P", help="weights: a diffusers folder (with unet/, or the unet "
                   "folder itself), whose config.json defines the model, or a single .safetensors "
                   "checkpoint of the preset's architecture (sdxl); default: seeded random weights")
    p.add_argument("--lora", metavar="FILE[:SCALE]", action="append", default=[],
                   help="fold a LoRA (diffusers/PEFT or kohya .safetensors) into the quantized model; repeatable")
    p.add_argument("--quantized", metavar="CKPT", help="start from a quantized checkpoint "
                   "(`export-engine quantize` output) instead of quantizing")
    p.add_argument("--target", choices=TARGETS,
                   help="engine target (default: plugin with TensorRT on a GPU; fp8 for --sm 89 "
                        "and native for --sm 120 with TensorRT-RTX)")
    p.add_argument("--sm", type=int, metavar="CC", help="compute capability for TensorRT-RTX CPU builds "
                   "(75, 80, 86, 89, 120, 121; default 89)")
    p.add_argument("--out", metavar="DIR", help="output folder (default models/MODEL-SCHEME)")
    p.add_argument("--no-build", dest="build", action="store_false", help="stop after the ONNX targets")
    p.add_argument("--force", action="store_true", help="redo every stage instead of reusing the cache")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--verify", dest="verify", action="store_true", default=None,
                   help="verify at the end (default: only for models under 200 M parameters)")
    v.add_argument("--no-verify", dest="verify", action="store_false")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="run each stage in its own process, so peak memory is one stage's "
                          "(default for models over 1 B parameters, e.g. sdxl)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false",
                     help="run every stage in this process (faster start, more memory)")
    g = p.add_argument_group("quantization")
    g.add_argument("--calib-samples", type=int, metavar="N")
    g.add_argument("--calib-steps", type=int, metavar="N")
    g.add_argument("--finetune-steps", type=int, metavar="N", help="TALoRA + DFA steps (0 = PTQ only)")
    g.add_argument("--nvfp4", action="store_true", help=NVFP4_HELP + " (use with --sm 120 or --target native)")
    g.add_argument("--keep-fp-shortcuts", action=argparse.BooleanOptionalAction, default=True,
                   help=SHORTCUTS_HELP)
    g.add_argument("--a8-budget", type=float, default=0.0, metavar="F", help=A8_BUDGET_HELP)
    g.add_argument("--a8-convs", action="store_true", help=A8_CONVS_HELP)
    g.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None, help=GPTQ_HELP)
    g.add_argument("--calib-embeddings", metavar="FILE", help=CALIB_EMBEDDINGS_HELP)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
    g = p.add_argument_group("export and engine profiles")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="fp16", action="store_true", default=None,
                      help="export float16 (default for models over 1 B parameters, e.g. sdxl)")
    prec.add_argument("--fp32", dest="fp16", action="store_false", help="export float32 (default below 1 B)")
    g.add_argument("--batch", type=_triple, default=(1, 1, 4), metavar="MIN:OPT:MAX",
                   help="images per batch (default 1:1:4); the UNet batch is doubled for "
                        "classifier-free guidance unless --no-cfg")
    g.add_argument("--no-cfg", dest="cfg", action="store_false")
    g.add_argument("--resolution", type=_triple, metavar="MIN:OPT:MAX",
                   help="image size in pixels (default: half to full native size, e.g. 512:1024:1024)")
    g.add_argument("--text-len", type=_triple, default=(77, 77, 77), metavar="MIN:OPT:MAX")
    p.set_defaults(func=_run, scheme=None)

    b = sub.add_parser("build", help="build a TensorRT engine from an existing export",
                       description="Build the engine for an export made with --no-build (or another "
                                   "target / SM). Needs `tensorrt` with a GPU, or `tensorrt_rtx`.")
    b.add_argument("out", metavar="OUT", help="the export folder (has manifest.json)")
    b.add_argument("--target", choices=TARGETS)
    b.add_argument("--sm", type=int, metavar="CC")
    b.add_argument("--force", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_build)

    v = sub.add_parser("verify", help="PyTorch vs ONNX Runtime (vs TensorRT) on an export",
                       description="End to end on several seeds and timesteps, judged against the "
                                   "quantization error itself, and layer by layer on identical inputs; "
                                   "writes OUT/verify/verify.{json,md,png}; exit 6 when a check fails "
                                   "(docs/parity.md).")
    v.add_argument("out", metavar="OUT")
    v.add_argument("--steps", type=int, default=4, help="timesteps per seed, spread over the schedule; every "
                   "TALoRA adapter gets one too (default 4)")
    v.add_argument("--seeds", type=int, default=3, help="seeded input sets (default 3)")
    v.add_argument("--ort-optimize", dest="optimize", action="store_true",
                   help="run ONNX Runtime with its graph optimizations on (they reorder float arithmetic)")
    v.add_argument("--no-layers", dest="layers", action="store_false", help="skip the per-layer check")
    v.add_argument("--graphs", type=lambda t: [g for g in t.split(",") if g], default=None, metavar="G[,G]",
                   help="which ONNX graphs run end to end: reference, plugin (default: every one the "
                        "export has; the full SDXL plugin graph took over 15 GB of memory in ONNX Runtime)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_verify)


def _run(args) -> int:
    from .pipeline import RunOptions, run

    opts = RunOptions(model=args.model, scheme=args.scheme or "w4a4", model_path=args.model_path,
                      loras=args.lora, quantized=args.quantized, target=args.target, sm=args.sm,
                      out=args.out, build=args.build, force=args.force, quiet=args.quiet,
                      verify=args.verify, isolate=args.isolate, fp16=args.fp16,
                      calib_samples=args.calib_samples, calib_steps=args.calib_steps,
                      finetune_steps=args.finetune_steps, nvfp4=args.nvfp4, seed=args.seed,
                      keep_fp_shortcuts=args.keep_fp_shortcuts, a8_budget=args.a8_budget,
                      a8_convs=args.a8_convs, gptq=args.gptq,
                      calib_embeddings=args.calib_embeddings, threads=args.threads,
                      batch=args.batch, resolution=args.resolution, text_len=args.text_len, cfg=args.cfg)
    run(opts)
    return EXIT_OK


def _build(args) -> int:
    from .pipeline import build_existing

    build_existing(args.out, target=args.target, sm=args.sm, force=args.force, quiet=args.quiet)
    return EXIT_OK


def _verify(args) -> int:
    from .verify import verify_export

    report = verify_export(args.out, steps=args.steps, seeds=args.seeds, quiet=args.quiet, layers=args.layers,
                           optimize=args.optimize, graphs=args.graphs)
    if not report["passed"]:
        raise UserError(f"verify: {report['failed'][0]} (see {args.out}/verify/verify.md)", EXIT_TOLERANCE)
    return EXIT_OK
