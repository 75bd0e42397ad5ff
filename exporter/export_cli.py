"""`export-engine export CKPT_OR_MODEL --out DIR [--fp16]`: the ONNX export stage on its own.

CKPT_OR_MODEL is a quantized checkpoint (a folder with quantized.json, or that file) or a model
preset name (then it is quantized first with the quantize stage's defaults). Writes
``DIR/unet.onnx`` (+ ``DIR/unet.onnx.data`` above 2 GB) and ``DIR/export.json`` (inputs, dynamic
dims, opset, layers, sizes and sha256 of the files). docs/export.md describes the graph.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from .cli import EXIT_INPUT, EXIT_OK, EXIT_OUTPUT, UserError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a quantized UNet to ONNX (QuantizeFP/DequantizeFP ops)",
        description="Export a quantized UNet (checkpoint of `export-engine quantize`, or a preset "
                    "quantized on the fly) to ONNX with the export_engine QuantizeFP/DequantizeFP "
                    "ops, dynamic batch/height/width/text length.")
    p.add_argument("source", metavar="CKPT_OR_MODEL",
                   help="quantized checkpoint folder (or its quantized.json), or a model preset name")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    p.add_argument("--model", metavar="PRESET",
                   help="the model the checkpoint must be for (default: the one it names)")
    p.add_argument("--fp16", action="store_true", help="export float16 weights and activations "
                   "(quantizer scales stay float32); default float32")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (>= 21, default 21)")
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="weights in one OUT/unet.onnx.data file: above 2 GB (auto), always or never")
    g = p.add_argument_group("example input used for tracing (the exported dims stay dynamic)")
    g.add_argument("--batch", type=int, default=2)
    g.add_argument("--height", type=int, default=None, metavar="PX", help="image height in pixels")
    g.add_argument("--width", type=int, default=None, metavar="PX", help="image width in pixels")
    g.add_argument("--text-len", type=int, default=77, metavar="L")
    p.add_argument("--verify", action="store_true",
                   help="run the ONNX in ONNX Runtime against PyTorch at a few timesteps and report")
    p.add_argument("--quiet", action="store_true", help="print only the ONNX path")
    p.set_defaults(func=run)


def load_source(source: str, model: str | None = None):
    """(quantized UNet, description) from a checkpoint path or a preset name."""
    from .checkpoint import JSON_NAME, load_checkpoint
    from .models import PRESETS

    path = Path(source)
    if path.exists():
        if path.is_dir() and not (path / JSON_NAME).is_file():
            raise UserError(f"{path} is not a quantized checkpoint (no {JSON_NAME} inside); make one "
                            "with `export-engine quantize`", EXIT_INPUT)
        return load_checkpoint(path, preset=model), f"checkpoint {path}"
    if source in PRESETS:
        from .quantize import quantize_model

        if model and model != source:
            raise UserError(f"--model {model} does not match the model {source}", EXIT_INPUT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet, _ = quantize_model(source)
        return unet, f"preset {source} (quantized with default settings)"
    raise UserError(f"{source!r} is neither a checkpoint folder nor a model preset "
                    f"({', '.join(PRESETS)})", EXIT_INPUT)


def run(args: argparse.Namespace) -> int:
    from .atomic import atomic_write_json, check_writable_dir, sha256_file
    from .export import ExportError, export_unet

    if args.opset < 21:
        raise UserError(f"--opset must be 21 or newer, got {args.opset}")
    out = Path(args.out)
    try:
        check_writable_dir(out)
    except PermissionError as err:
        raise UserError(str(err), EXIT_OUTPUT) from None
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    t0 = time.time()
    say(f"loading {args.source}")
    unet, what = load_source(args.source, args.model)
    lat = lambda px: None if px is None else px // 8  # noqa: E731
    say(f"exporting {what} to {out / 'unet.onnx'} ({'fp16' if args.fp16 else 'fp32'}, opset {args.opset})")
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    try:
        res = export_unet(unet, out / "unet.onnx", batch=args.batch, height=lat(args.height),
                          width=lat(args.width), text_len=args.text_len, fp16=args.fp16,
                          opset=args.opset, external_data=external)
    except ExportError as err:
        raise UserError(str(err), EXIT_INPUT) from None
    except OSError as err:
        raise UserError(f"writing {out / 'unet.onnx'} failed: {err}", EXIT_OUTPUT) from None
    files = [res.onnx_path] + ([res.data_path] if res.data_path else [])
    manifest = {
        "source": what, "onnx": res.onnx_path.name,
        "data": res.data_path.name if res.data_path else None,
        "dtype": "float16" if args.fp16 else "float32", "opset": args.opset,
        "domain": {"name": "export_engine", "version": 1},
        "inputs": res.input_names, "outputs": ["out_sample"],
        "dynamic_dims": ["batch", "height", "width", "text_len"],
        "quantized_layers": res.num_quant_layers,
        "files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files},
    }
    if args.verify:
        manifest["verify"] = _verify(unet, res.onnx_path, args, say)
    atomic_write_json(out / "export.json", manifest)
    say(f"done in {time.time() - t0:.0f} s: {res.num_quant_layers} quantized layers, "
        f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB")
    if args.quiet:
        print(res.onnx_path)
    return EXIT_OK


def _verify(unet, onnx_path: Path, args, say) -> dict:
    import torch

    from .export import unet_call, unet_example_inputs
    from .parity import parity

    results = {}
    dtype = next(unet.parameters()).dtype
    for t in (999.0, 500.0, 20.0):
        inputs = unet_example_inputs(unet, batch=1, text_len=min(args.text_len, 16), dtype=dtype)
        inputs["timestep"] = torch.tensor(t)
        rep = parity(unet, onnx_path, inputs, call=unet_call, layers=False)
        say(f"  t={t:g}: ONNX Runtime vs PyTorch rel L2 {rep.whole.rel_l2:.2e}, "
            f"max abs {rep.whole.max_abs:.2e}")
        results[str(t)] = {"rel_l2": rep.whole.rel_l2, "max_abs": rep.whole.max_abs}
    return results
