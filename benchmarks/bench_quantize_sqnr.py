"""Per-layer output SQNR on sdxl-tiny for the MSFP ablation, and pruned vs exhaustive search.

    .venv/bin/python benchmarks/bench_quantize_sqnr.py [--weights random|heavy-tailed] [--finetune-steps N]
                                                      [--no-exhaustive] [--per-layer]

Variants, all W4A4 from the same calibration data:
  (a) signed FP4 only (e1m2 / e2m1 / e3m0 for activations and weights)
  (b) MSFP mixup-sign: + unsigned FP4 with a zero point for AAL inputs
  (c) + MPQ-DM mixed precision (smoothing, N-1 / N / N+1 bits per output channel)
  (d) + TALoRA / DFA fine-tuning of (c)
  (cu) (c) with uniform N-bit weights (same smoothing and formats): isolates the mixed precision
Per-layer SQNR = 10 log10(|y|^2 / |y_q - y|^2) with y the FP layer output and y_q the quantized
layer's output on the same input (the FP network's input to that layer), on held-out calibration
samples at every sampler step. Random weights make absolute numbers meaningless; the comparisons
are real. ``--weights heavy-tailed`` redraws every weight row from a Student-t (nu = 4) with a
log-normal per-row scale, like trained weights (outlier channels); the default keeps the
preset's seeded random (uniform) weights.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from exporter.calibration import CalibConfig, collect_calibration  # noqa: E402
from exporter.finetune import eval_metrics, finetune  # noqa: E402
from exporter.layers import QUANT_LAYERS  # noqa: E402
from exporter.models import get_preset, run_unet  # noqa: E402
from exporter.msfp import SearchSpace  # noqa: E402
from exporter.quantize import apply_choices, search_layers, select_layers  # noqa: E402

VARIANTS = {
    "a": ("signed FP4 only", SearchSpace(a_unsigned=(), mixed_precision=False)),
    "b": ("MSFP mixup-sign", SearchSpace(mixed_precision=False)),
    "c": ("+ mixed precision", SearchSpace()),
    # (c) with every channel at N bits: mp_step larger than any layer disables the bit allocation
    # only; smoothing, formats, scales and subsamples (same seed) are (c)'s, so (c) - (cu) on
    # held-out samples isolates the N-1 / N / N+1 bits
    "cu": ("(c) with uniform bits", SearchSpace(mp_step=1 << 30)),
}


def heavy_tailed_(model: torch.nn.Module, seed: int) -> None:
    """Redraw Linear/Conv2d weights: Student-t(4) rows with log-normal row scales, same layer std."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(4.0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if type(m) in QUANT_LAYERS:
                w = m.weight
                rows = t.sample(w.shape).reshape(w.shape[0], -1)
                rows *= torch.exp(0.5 * torch.randn(w.shape[0], 1, generator=g))
                rows *= w.std() / rows.std()
                w.copy_(rows.reshape(w.shape).half().float())


def layer_sqnr(fp: torch.nn.Module, quantized: dict, calib, names: list[str]) -> dict:
    """{variant: {layer: SQNR dB}} on the held-out samples of every calibration record."""
    idx = torch.tensor(calib.eval_samples())
    sig = {n: 0.0 for n in names}
    noise = {v: {n: 0.0 for n in names} for v in quantized}
    for r in calib.records:
        inputs = {k: (v[idx] if v.dim() > 0 else v) for k, v in r.inputs.items()}
        captured = {}
        hooks = [fp.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: captured.__setitem__(n, args[0].detach())) for n in names]
        with torch.no_grad():
            run_unet(fp, inputs)
        for h in hooks:
            h.remove()
        for v, model in quantized.items():
            ctrl = getattr(model, "talora", None)
            if ctrl is not None:
                ctrl.selection.select(ctrl.adapter_for_timestep(r.timestep))
        with torch.no_grad():
            for n in names:
                x = captured[n]
                y = fp.get_submodule(n)(x)
                sig[n] += float(y.pow(2).sum())
                for v, model in quantized.items():
                    noise[v][n] += float((model.get_submodule(n)(x) - y).pow(2).sum())
    return {v: {n: 10 * math.log10(sig[n] / noise[v][n]) if noise[v][n] > 0 else float("inf") for n in names}
            for v in quantized}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", choices=("random", "heavy-tailed"), default="random")
    ap.add_argument("--finetune-steps", type=int, default=60, help="the CLI default for sdxl-tiny on a CPU is 20")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-exhaustive", action="store_true", help="skip the pruned vs exhaustive comparison")
    ap.add_argument("--per-layer", action="store_true", help="print every layer's SQNR")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # small model: one thread is faster and steadier

    preset = get_preset("sdxl-tiny")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp = preset.build(seed=args.seed)
    if args.weights == "heavy-tailed":
        heavy_tailed_(fp, args.seed)
    names, _ = select_layers(fp, None, preset.keep_fp)
    calib = collect_calibration(fp, preset, CalibConfig(samples=args.samples, steps=args.steps, resolution=128,
                                                        seed=args.seed, holdout=1, max_tokens=512), capture=names)
    print(f"sdxl-tiny, {args.weights} weights, {len(names)} quantized layers, calibration "
          f"{args.samples} samples x {args.steps} Euler steps (train {calib.train}, held out {calib.holdout})")

    choices, models = {}, {}
    for key, (label, space) in VARIANTS.items():
        t = time.perf_counter()
        choices[key] = search_layers(fp, calib, names, space, seed=args.seed, keep_captures=True)
        models[key] = apply_choices(copy.deepcopy(fp), choices[key])
        print(f"  ({key}) {label}: search {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    models["d"] = copy.deepcopy(models["c"])
    ft = finetune(models["d"], calib, args.finetune_steps, seed=args.seed)
    print(f"  (d) + TALoRA/DFA: {args.finetune_steps} steps in {time.perf_counter() - t:.1f} s; "
          f"held-out DFA loss {ft.heldout_before:.5f} -> {ft.heldout_after:.5f}")

    sq = layer_sqnr(fp, models, calib, names)
    aal = [n for n in names if choices["b"][n].aal]
    outliers = [n for n in names if choices["c"][n].mp_k > 0]
    print("\nper-layer output SQNR on held-out samples (dB): mean / median / min")
    for key in ("a", "b", "c", "d"):
        v = list(sq[key].values())
        print(f"  ({key}) {VARIANTS.get(key, ('+ TALoRA/DFA fine-tuning',))[0]:26s} "
              f"{statistics.mean(v):6.2f} / {statistics.median(v):6.2f} / {min(v):6.2f}")
    gain = [sq["b"][n] - sq["a"][n] for n in aal]
    print(f"\nAAL layers ({len(aal)}): mixup-sign vs signed-only SQNR gain mean {statistics.mean(gain):+.2f} dB, "
          f"better on {sum(g > 0 for g in gain)}/{len(aal)}; unsigned format chosen on "
          f"{sum(choices['b'][n].a_format.startswith('u') for n in aal)}")
    nal = [n for n in names if n not in aal]
    print(f"normal layers ({len(nal)}): (b) - (a) mean {statistics.mean(sq['b'][n] - sq['a'][n] for n in nal):+.2f} dB")
    same = all(choices["cu"][n].w_format == choices["c"][n].w_format and choices["cu"][n].a_format ==
               choices["c"][n].a_format and (choices["cu"][n].smooth is None) == (choices["c"][n].smooth is None)
               and choices["cu"][n].mp_k == 0 for n in names)
    if not same:
        print("WARNING: (cu) differs from (c) in more than the bit allocation")
    if outliers:
        mp_gain = [10 * math.log10(choices["c"][n].info["mp_errors"]["uniform"] / choices["c"][n].info["mp_errors"]["mixed"])
                   for n in outliers]
        held = [sq["c"][n] - sq["cu"][n] for n in outliers]
        print(f"layers with outlier channels (MPQ-DM gave k > 0 channels N+1 bits: {len(outliers)}): mixed vs uniform "
              f"bits, same smoothing: {statistics.mean(mp_gain):+.2f} dB on calibration rows (in-sample: k > 0 only "
              f"where it helps there), {statistics.mean(held):+.2f} dB held out ((c) - (cu), better on "
              f"{sum(g > 0 for g in held)}/{len(held)}, min {min(held):+.2f}); "
              f"(c) - (b) held-out {statistics.mean(sq['c'][n] - sq['b'][n] for n in outliers):+.2f} dB "
              f"(bits + smoothing)")
    smoothed = [n for n in names if choices["c"][n].smooth is not None]
    print(f"smoothing kept on {len(smoothed)}/{len(names)} layers; (c) - (b) over all layers "
          f"{statistics.mean(sq['c'][n] - sq['b'][n] for n in names):+.2f} dB")
    print(f"(d) - (c) per layer: mean {statistics.mean(sq['d'][n] - sq['c'][n] for n in names):+.2f} dB "
          f"(fine-tuning optimises the network output, not each layer)")

    print("\nend-to-end noise prediction on held-out samples (eps SQNR dB / DFA loss):")
    for key in ("a", "b", "cu", "c", "d"):
        m = eval_metrics(models[key], calib)
        print(f"  ({key}) {m['eps_sqnr_db']:6.2f} dB / {m['dfa_loss']:.5f}")

    if args.per_layer:
        cols = ("a", "b", "cu", "c", "d")
        print(f"\n{'layer':70s} {'AAL':>3s} {'a_fmt(b)':>8s} {'k':>3s} " + " ".join(f"({k})".rjust(7) for k in cols))
        for n in names:
            c = choices["c"][n]
            print(f"{n:70s} {'y' if c.aal else '-':>3s} {choices['b'][n].a_format:>8s} {c.mp_k:3d} "
                  + " ".join(f"{sq[k][n]:7.2f}" for k in cols))

    if not args.no_exhaustive:
        t = time.perf_counter()
        full = search_layers(fp, calib, names, SearchSpace(mixed_precision=False, exhaustive=True),
                             seed=args.seed, keep_captures=True)
        pruned = choices["b"]
        same_w = sum(pruned[n].w_format == full[n].w_format for n in names)
        same_a = sum(pruned[n].a_format == full[n].a_format for n in names)
        both = sum(pruned[n].w_format == full[n].w_format and pruned[n].a_format == full[n].a_format for n in names)
        gap = [full[n].sqnr_db - pruned[n].sqnr_db for n in names]
        print(f"\npruned vs exhaustive search ({time.perf_counter() - t:.1f} s for the exhaustive one, "
              f"{len(names)} layers, no mixed precision):")
        print(f"  same weight format {same_w}/{len(names)} ({same_w / len(names):.1%}), same activation format "
              f"{same_a}/{len(names)} ({same_a / len(names):.1%}), both {both / len(names):.1%}")
        print(f"  calibration-row SQNR the exhaustive search gains over the pruned one: mean {statistics.mean(gap):.2f} dB,"
              f" max {max(gap):.2f} dB")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
