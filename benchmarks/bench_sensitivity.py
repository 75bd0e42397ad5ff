"""How much does the quantized UNet's output move when its input moves by float rounding?

For every seed and timestep (verify's inputs: ``exporter.verify.e2e_feeds``) this runs the
checkpoint's quantized PyTorch model on ``sample`` and on ``sample * (1 + eps)`` and reports

    sensitivity   ||q(x') - q(x)|| / ||q(x)||     (fp32 alone: about eps)
    quant error   ||q(x) - fp(x)|| / ||q(x)||     (the model's own quantization noise)
    flips         activation codes that differ between the two runs, over all quantized layers

and, for the worst input, where the change is born and how it grows: per quantized layer in
execution order, the relative change of its activation input, its flipped codes and the relative
change of its output. A large output change right after a few flips names the amplifier.

    python benchmarks/bench_sensitivity.py models/sdxl-tiny-w4a4 [--seeds 3] [--steps 6]

Prints a table and writes ``benchmarks/results/sensitivity_<name>.json`` (``--json`` to move it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.checkpoint import load_checkpoint  # noqa: E402
from exporter.export import find_adapter_table, unet_call  # noqa: E402
from exporter.layers import quant_layers  # noqa: E402
from exporter.parity import _set_torch_adapter, e2e_timesteps, quantization_off, torch_act_codes  # noqa: E402
from exporter.pipeline import model_preset, read_manifest  # noqa: E402
from exporter.atomic import atomic_write_json  # noqa: E402
from exporter.verify import e2e_feeds  # noqa: E402

from machine import cpu_name  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class LayerTrace:
    """Records each quantized layer's activation-quantizer input and the layer's output."""

    def __init__(self, model):
        self.layers = list(quant_layers(model))
        self.a_in: dict[str, torch.Tensor] = {}
        self.out: dict[str, torch.Tensor] = {}
        self.hooks = []
        for name, layer in self.layers:
            self.hooks.append(layer.a_quant.register_forward_pre_hook(self._keep(self.a_in, name, 0)))
            self.hooks.append(layer.register_forward_hook(self._keep(self.out, name, None)))

    @staticmethod
    def _keep(store, name, arg):
        def hook(mod, args, output=None):
            store[name] = (args[arg] if arg is not None else output).detach().clone()
        return hook

    def snapshot(self):
        a, o = dict(self.a_in), dict(self.out)
        self.a_in.clear()
        self.out.clear()
        return a, o

    def close(self):
        for h in self.hooks:
            h.remove()


def measure(model, feeds, table, eps: float, trace: LayerTrace):
    rows = []
    for seed, f in feeds:
        _set_torch_adapter(model, table, f["timestep"])
        g = dict(f, sample=f["sample"] * (1 + eps))
        with torch.no_grad():
            q = unet_call(model, *f.values())
            base = trace.snapshot()
            q2 = unet_call(model, *g.values())
            moved = trace.snapshot()
            with quantization_off(model):
                fp = unet_call(model, *f.values())
                fp2 = unet_call(model, *g.values())
                trace.snapshot()
        layers = []
        for name, layer in trace.layers:
            if name not in base[0]:
                continue  # not run for this input (e.g. a TALoRA branch)
            flips = int((torch_act_codes(layer, base[0][name]) != torch_act_codes(layer, moved[0][name])).sum())
            layers.append({"layer": name, "in_change": _rel(moved[0][name], base[0][name]), "flips": flips,
                           "codes": base[0][name].numel(), "out_change": _rel(moved[1][name], base[1][name])})
        rows.append({"seed": seed, "timestep": float(f["timestep"]), "sensitivity": _rel(q2, q),
                     "fp32_sensitivity": _rel(fp2, fp), "quant_err": _rel(q, fp) * float(fp.norm() / q.norm()),
                     "flips": sum(l["flips"] for l in layers), "layers": layers})
    return rows


def birth(layers: list[dict], top: int = 8) -> list[dict]:
    """The layers where the change grows most: output change over input change, flipped layers first."""
    grown = [dict(l, gain=l["out_change"] / max(l["in_change"], 1e-12)) for l in layers if l["flips"]]
    return sorted(grown, key=lambda l: -l["gain"])[:top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="an export dir (its manifest names the checkpoint) or a quantized.json")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timesteps spread over the schedule (+ one per adapter)")
    ap.add_argument("--eps", type=float, default=1e-6)
    ap.add_argument("--latent", type=int, help="latent height and width (default: the calibration size)")
    ap.add_argument("--json", help="where to write the results (default benchmarks/results/sensitivity_<name>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the numbers must not depend on the machine (docs/quantization.md)

    src = Path(args.out)
    if src.is_dir():
        m = read_manifest(src)
        ckpt = Path(m["artifacts"]["checkpoint"])
        ckpt = ckpt if ckpt.is_absolute() else src / ckpt
        name = src.name
    else:
        ckpt, name = src, src.parent.parent.name
    preset = model_preset(json.loads(ckpt.read_text())["preset"], quantized=ckpt)
    model = load_checkpoint(ckpt, preset=preset).eval()
    table = find_adapter_table(model)
    timesteps = e2e_timesteps(table, args.steps, preset.scheduler.get("num_train_timesteps", 1000))
    # the calibration size, not verify's smallest latent: with few values a 1e-6 change rarely
    # moves any code across a rounding midpoint, and the model would look perfectly stable
    lat = args.latent or preset.defaults("cpu").resolution // 8
    feeds = e2e_feeds(model, args.seeds, timesteps, torch.float32, lat)
    trace = LayerTrace(model)
    t0 = time.perf_counter()
    rows = measure(model, feeds, table, args.eps, trace)
    trace.close()

    print(f"{name}: output change for sample x (1 + {args.eps:g}); {len(rows)} inputs ({lat}x{lat} latent), "
          f"{len(trace.layers)} quantized layers, {time.perf_counter() - t0:.0f} s")
    print(f"{'timestep':>8} {'sens median':>12} {'sens worst':>11} {'quant err':>10} {'fp32 sens':>10} {'flips':>6}")
    by_t: dict[float, list[dict]] = {}
    for r in rows:
        by_t.setdefault(r["timestep"], []).append(r)
    for t, rs in sorted(by_t.items(), reverse=True):
        print(f"{t:8.0f} {statistics.median(r['sensitivity'] for r in rs):12.3e} "
              f"{max(r['sensitivity'] for r in rs):11.3e} {statistics.median(r['quant_err'] for r in rs):10.3f} "
              f"{max(r['fp32_sensitivity'] for r in rs):10.1e} {max(r['flips'] for r in rs):6d}")
    sens = [r["sensitivity"] for r in rows]
    worst = max(rows, key=lambda r: r["sensitivity"])
    summary = {"median": statistics.median(sens), "worst": max(sens),
               "worst_input": {"seed": worst["seed"], "timestep": worst["timestep"]},
               "median_quant_err": statistics.median(r["quant_err"] for r in rows),
               "inputs_with_flips": sum(r["flips"] > 0 for r in rows) / len(rows),
               "worst_over_quant_err": max(r["sensitivity"] / r["quant_err"] for r in rows)}
    print(f"all: median {summary['median']:.3e}, worst {summary['worst']:.3e} (seed {worst['seed']}, "
          f"t={worst['timestep']:g}); worst / quantization error {summary['worst_over_quant_err']:.2f}; "
          f"{summary['inputs_with_flips']:.0%} of inputs flip a code")
    grown = birth(worst["layers"])
    if grown:
        print(f"where the worst input's change grows (flipped layers by output/input change):")
        print(f"{'layer':<62} {'flips':>6} {'in change':>10} {'out change':>10} {'gain':>8}")
        for l in grown:
            print(f"{l['layer'][-62:]:<62} {l['flips']:6d} {l['in_change']:10.2e} {l['out_change']:10.2e} "
                  f"{l['gain']:8.1e}")
    result = {"bench": "sensitivity", "model": name, "checkpoint": str(ckpt), "eps": args.eps, "latent": lat,
              "cpu": cpu_name(), "torch_threads": 1,
              "command": "python benchmarks/bench_sensitivity.py " + " ".join(argv or sys.argv[1:]),
              "summary": summary, "worst_growth": grown,
              "inputs": [{k: v for k, v in r.items() if k != "layers"} for r in rows]}
    path = Path(args.json or Path(__file__).parent / "results" / f"sensitivity_{name}.json")
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
