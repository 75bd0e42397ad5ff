"""W4A4 quality on a TRAINED UNet: eps-prediction MSE against the true noise, as a ratio to fp32's.

    PYTHONPATH=. .venv/bin/python benchmarks/train_tiny_unet.py            # once: models/tiny-trained
    PYTHONPATH=. .venv/bin/python benchmarks/bench_quality.py [--model models/tiny-trained]
        [--finetune-steps 200] [--calib-samples 10] [--calib-steps 8] [--max-tokens 512]
        [--no-onnx] [--ablation one|all-but-one|none] [--variants a,b,c,bs,cs] [--quant-options JSON]

Held-out samples (OUT/heldout.safetensors of the training script: latents and noise never seen in
training) are noised to x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at t = 100, 300, 500, 700,
900; each model predicts eps from (x_t, t, its class's conditioning) and is scored by
mean((eps_pred - eps)^2). A quantized model's *ratio* is its MSE over fp32's own MSE (fp32 is not
perfect, so 1.00 = no loss from quantization). Variants, all W4A4 through
exporter.quantize.quantize_model on the folder (the generic ``unet`` preset, its keep_fp layers):
  (a) PTQ, seeded random calibration embeddings (what a user without prompts gets), no fine-tuning
  (b) PTQ, the model's real class embeddings (OUT/calib_embeddings.safetensors)
  (c) (b) + TALoRA fine-tuning (the quantize stage's defaults: uniform weights, fresh noise)
(bs) / (cs): (b) / (c) with ``keep_fp_shortcuts`` (the last up block's skip conv_shortcut layers
kept in higher precision, the fix the ablation points to). The last variant listed is also exported (reference ONNX target: FP4 numerics as standard ops) and run in ONNX Runtime.
``sens`` is the chaos check of issue #11: relative output change when the input is scaled by
(1 + 1e-6), the largest over the held-out batches (one per timestep; fp32: about 1e-6).

``--ablation one``: quantize one layer at a time (the others fp32; the same per-layer search
result as the full run, since every layer's search reads the FP model's captures), also with only
its weights or only its activations quantized; ``all-but-one``: every layer but one. Layers ranked
by eps-MSE cost. Results: benchmarks/results/quality_<cpu>.json (with the command).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from exporter.layers import quant_layers  # noqa: E402
from machine import cpu_name, cpu_tag  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

TARGETS = {"b": 1.10, "c": 1.05, "bs": 1.10, "cs": 1.05}


def alphas_cumprod(scheduler: dict) -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler).alphas_cumprod.double()


class HeldOut:
    """Noisy held-out inputs per timestep, with the true noise."""

    def __init__(self, folder: Path, scheduler: dict):
        from safetensors.torch import load_file

        h = load_file(folder / "heldout.safetensors")
        c = load_file(folder / "calib_embeddings.safetensors")
        ac = alphas_cumprod(scheduler)
        lab = h["labels"].long()
        self.cond = {"encoder_hidden_states": c["encoder_hidden_states"][lab],
                     "text_embeds": c["text_embeds"][lab], "time_ids": c["time_ids"][lab]}
        self.timesteps = [int(t) for t in h["timesteps"]]
        self.batches = []  # (t, feeds, true noise)
        for i, t in enumerate(self.timesteps):
            a = float(ac[t])
            x_t = math.sqrt(a) * h["x0"] + math.sqrt(1 - a) * h["noise"][i]
            feeds = {"sample": x_t.float(), "timestep": torch.tensor(float(t)), **self.cond}
            self.batches.append((t, feeds, h["noise"][i]))


def run_torch(model, feeds):
    from exporter.models.presets import run_unet

    with torch.no_grad():
        return run_unet(model, feeds).float()


def eps_mse(predict, held: HeldOut) -> dict[int, float]:
    return {t: float((predict(f) - eps).pow(2).mean()) for t, f, eps in held.batches}


def sensitivity(predict, held: HeldOut, rel: float = 1e-6) -> float:
    """Largest relative output change over the held-out batches (one per timestep) when the
    sample is scaled by (1 + rel) (issue #11)."""
    out = []
    for _, f, _ in held.batches:
        y0 = predict(f)
        y1 = predict({**f, "sample": f["sample"] * (1 + rel)})
        out.append(float((y1 - y0).norm() / y0.norm().clamp_min(1e-30)))
    return max(out)


def summarize(mse: dict[int, float], fp: dict[int, float]) -> dict:
    ratios = {t: mse[t] / fp[t] for t in fp}
    return {"mse": mse, "ratio_per_t": ratios,
            "ratio": sum(mse.values()) / sum(fp.values())}  # ratio of the MSE summed over timesteps


def quantize(fp, folder: Path, args, embeddings: str | None, finetune_steps: int, **extra):
    from exporter.quantize import QuantizeConfig, quantize_model

    cfg = QuantizeConfig(scheme="w4a4", calib_samples=args.calib_samples, calib_steps=args.calib_steps,
                         calib_holdout=0, max_tokens=args.max_tokens, calib_embeddings=embeddings,
                         finetune_steps=finetune_steps, seed=args.seed, device="cpu", evaluate=False,
                         threads=1, **extra)
    return quantize_model("unet", cfg, model_path=str(folder), model=copy.deepcopy(fp))


def onnx_predictor(model, workdir: Path):
    """Export ``model``, build the reference target and return an ORT predictor."""
    from exporter.export import export_unet
    from exporter.parity import ort_session, run_onnx
    from graph_passes.targets import build_target

    raw, ref = workdir / "unet.onnx", workdir / "reference.onnx"
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_unet(model, raw, batch=2, height=2 * factor, width=2 * factor, text_len=8)
    build_target(raw, "reference", ref, quiet=True)
    sess = ort_session(ref, threads=1)
    names = [i.name for i in sess.get_inputs()]
    return lambda f: torch.from_numpy(next(iter(run_onnx(sess, {k: f[k] for k in names}).values()))).float()


def ablation(fp, folder: Path, args, held: HeldOut, fp_mse: dict, mode: str, log) -> list[dict]:
    """Per-layer eps-MSE cost from one search over all layers (real embeddings, no fine-tuning)."""
    from exporter.calibration import collect_calibration
    from exporter.models.presets import get_preset
    from exporter.quantize import (QuantizeConfig, apply_choices, calib_config, search_layers,
                                   select_layers)

    preset = get_preset("unet").for_model_path(str(folder))
    cfg = QuantizeConfig(scheme="w4a4", calib_samples=args.calib_samples, calib_steps=args.calib_steps,
                         calib_holdout=0, max_tokens=args.max_tokens,
                         calib_embeddings=str(folder / "calib_embeddings.safetensors"), seed=args.seed,
                         **json.loads(args.quant_options))
    names, _ = select_layers(fp, cfg.include, cfg.exclude_regex(preset))
    calib = collect_calibration(fp, preset, calib_config(preset, cfg, "cpu"), capture=names)
    choices = search_layers(fp, calib, names, cfg.search_space(), seed=cfg.seed)
    fp_total = sum(fp_mse.values())
    rows = []
    for i, name in enumerate(names):
        pick = [name] if mode == "one" else [n for n in names if n != name]
        model = apply_choices(copy.deepcopy(fp), {n: choices[n] for n in pick})
        row = {"layer": name, "w_format": choices[name].w_format, "a_format": choices[name].a_format,
               "aal": choices[name].aal, "smooth": choices[name].smooth is not None,
               "mp_k": choices[name].mp_k, "layer_sqnr_db": choices[name].sqnr_db}
        row["ratio"] = sum(eps_mse(lambda f: run_torch(model, f), held).values()) / fp_total
        if mode == "one":  # which of the two quantizers of this layer costs
            layer = model.get_submodule(name)
            for part, (w_on, a_on) in {"ratio_w_only": (True, False), "ratio_a_only": (False, True)}.items():
                a_was = layer.a_quant.enabled
                layer.w_quant.enabled, layer.a_quant.enabled = w_on, a_on and a_was
                row[part] = sum(eps_mse(lambda f: run_torch(model, f), held).values()) / fp_total
                layer.w_quant.enabled, layer.a_quant.enabled = True, a_was
            row["sens"] = sensitivity(lambda f: run_torch(model, f), held)
        rows.append(row)
        log(f"  ablation {i + 1}/{len(names)} {name}: ratio {row['ratio']:.4f}")
    key = (lambda r: -r["ratio"]) if mode == "one" else (lambda r: r["ratio"])
    return sorted(rows, key=key)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/tiny-trained")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=10)
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="a,b,c,bs,cs")
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--ablation", choices=("none", "one", "all-but-one"), default="none")
    ap.add_argument("--quant-options", default="{}",
                    help='extra QuantizeConfig fields as JSON, e.g. \'{"mixed_precision": false}\'')
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality_<cpu>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers import UNet2DConditionModel

    from exporter.models.presets import get_preset

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    folder = Path(args.model)
    fp = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    preset = get_preset("unet").for_model_path(str(folder))
    held = HeldOut(folder, preset.scheduler)
    fp_mse = eps_mse(lambda f: run_torch(fp, f), held)
    result = {"cpu": cpu_name(), "command": " ".join(["python"] + sys.argv), "model": str(folder),
              "parameters": sum(p.numel() for p in fp.parameters()),
              "settings": {k: v for k, v in vars(args).items()}, "fp32": {"mse": fp_mse,
              "sens": sensitivity(lambda f: run_torch(fp, f), held)}, "variants": {}}
    emb = str(folder / "calib_embeddings.safetensors")
    extra = json.loads(args.quant_options)
    ft = args.finetune_steps
    off = {"keep_fp_shortcuts": False}  # (a)-(c): every layer but the preset's keep-list W4A4
    specs = {"a": ("PTQ, random calib embeddings", None, 0, off),
             "b": ("PTQ, real calib embeddings", emb, 0, off),
             "c": (f"TALoRA fine-tuning {ft} steps, real embeddings", emb, ft, off),
             "bs": ("(b) + last up block's shortcuts kept FP", emb, 0, {"keep_fp_shortcuts": True}),
             "cs": ("(c) + last up block's shortcuts kept FP", emb, ft, {"keep_fp_shortcuts": True})}
    for key in [v for v in args.variants.split(",") if v]:
        label, embeddings, steps, own = specs[key]
        t0 = time.perf_counter()
        log(f"variant ({key}) {label}: quantizing")
        model, report = quantize(fp, folder, args, embeddings, steps, **{**own, **extra})
        row = {"label": label, **summarize(eps_mse(lambda f: run_torch(model, f), held), fp_mse),
               "sens": sensitivity(lambda f: run_torch(model, f), held),
               "quantized_layers": len(report.layers), "kept_fp": report.kept_fp}
        if not args.no_onnx and key == args.variants.split(",")[-1]:
            with tempfile.TemporaryDirectory() as tmp:
                predict = onnx_predictor(model, Path(tmp))
                row["onnx_reference"] = summarize(eps_mse(predict, held), fp_mse)
        row["seconds"] = time.perf_counter() - t0
        result["variants"][key] = row
        log(f"variant ({key}): ratio {row['ratio']:.4f}  ({row['seconds']:.0f}s)")
    if args.ablation != "none":
        result["ablation"] = {"mode": args.ablation,
                              "rows": ablation(fp, folder, args, held, fp_mse, args.ablation, log)}

    ts = held.timesteps
    print(f"eps-MSE vs true noise on {len(held.batches[0][2])} held-out samples; ratio = MSE / fp32 MSE")
    print(f"{'variant':44s} {'ratio':>7s} " + " ".join(f"t={t:<5d}" for t in ts) + "   sens")
    print(f"{'fp32 (MSE)':44s} {'1.000':>7s} " + " ".join(f"{fp_mse[t]:.4f} " for t in ts)
          + f"  {result['fp32']['sens']:.1e}")
    for key, row in result["variants"].items():
        target = f" (target <= {TARGETS[key]:.2f})" if key in TARGETS else ""
        print(f"({key}) {row['label'][:39]:{41 - len(key)}s} {row['ratio']:7.3f} "
              + " ".join(f"{row['ratio_per_t'][t]:6.3f} " for t in ts) + f"  {row['sens']:.1e}{target}")
        if "onnx_reference" in row:
            o = row["onnx_reference"]
            print(f"    {'same, ONNX reference in ORT':40s} {o['ratio']:7.3f} "
                  + " ".join(f"{o['ratio_per_t'][t]:6.3f} " for t in ts))
    if "ablation" in result:
        rows = result["ablation"]["rows"]
        print(f"\nablation ({args.ablation}), top 15 by cost:")
        for r in rows[:15]:
            more = (f" w-only {r['ratio_w_only']:.4f} a-only {r['ratio_a_only']:.4f} sens {r['sens']:.1e}"
                    if "ratio_w_only" in r else "")
            print(f"  {r['layer']:55s} {r['ratio']:.4f}{more}  w {r['w_format']} a {r['a_format']}"
                  f"{' AAL' if r['aal'] else ''}{' smooth' if r['smooth'] else ''}")
    dest = Path(args.out) if args.out else \
        Path(__file__).parent / "results" / f"quality_{cpu_tag()}.json"
    from exporter.atomic import atomic_write_json

    atomic_write_json(dest, result)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
