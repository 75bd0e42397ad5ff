"""`export-engine verify OUT`: PyTorch vs ONNX Runtime (reference and plugin graphs) vs TensorRT.

End to end: every target and PyTorch run the same inputs (``seeds`` seeded input sets at
``steps`` timesteps spread over the schedule, plus one per TALoRA adapter none of them reaches)
and are judged against the quantization error itself (:func:`exporter.parity.judge_end_to_end`:
quality, divergence and, for fp32 ONNX Runtime targets, agreement). Layer by layer: the export
itself, with every quantized layer's activation input, codes and output made graph outputs
(:func:`exporter.export.add_debug_outputs`, no second export) and lowered as the reference target,
and each layer is compared on the same input (:mod:`exporter.parity`): at most 0.01 % of activation
codes may differ, and the layer's output at most 1e-2 (relative L2). User LoRAs of the manifest
are added to the PyTorch model's float weights, as the graph passes add them. Writes
OUT/verify/verify.{json,md,png}; docs/parity.md has the why.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_path, atomic_write_json, atomic_write_text
from .cli import EXIT_INPUT, UserError

#: the ONNX graphs of an export that verify can run (manifest artifacts ``<graph>_onnx``)
GRAPHS = ("reference", "plugin")
CODES_DIFFER_TOL = 1e-4
#: a layer's output, PyTorch vs the graph on the graph's own input: relative L2 (the codes' 1e-4
#: allows a flipped code or two, which moves an output by well under 1e-2; a wrong weight, LoRA
#: or scale moves it by far more)
LAYER_OUT_TOL = 1e-2


def _engine_runner(engine_path: Path):
    """A callable feeds -> output for a TensorRT engine, or (None, why) when none can run here."""
    from .pipeline import cuda_available, has_module

    if not has_module("tensorrt") or not cuda_available():
        return None, "no TensorRT runtime with a CUDA GPU here (TensorRT-RTX engines built on a CPU run on their GPU only)"
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()

    def run(feeds: dict) -> np.ndarray:
        keep = {}
        for name, value in feeds.items():
            t = torch.as_tensor(np.ascontiguousarray(value)).cuda()
            keep[name] = t
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        out_name = next(engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                        if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT)
        out = torch.empty(tuple(context.get_tensor_shape(out_name)), device="cuda",
                          dtype=keep["sample"].dtype)
        context.set_tensor_address(out_name, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.float().cpu().numpy()

    return run, None


def apply_user_loras(model, loras: list[tuple[str, dict]]) -> int:
    """Add user LoRA deltas (``graph_passes.lora_files.read_lora_file``) to the float weights of
    ``model`` in place, as ``graph_passes.fold_lora`` adds them to the graph's; returns the count."""
    import torch

    count = 0
    with torch.no_grad():
        for _, deltas in loras:
            for module, d in deltas.items():
                weight = model.get_submodule(module).weight
                weight.add_(torch.from_numpy(np.asarray(d.delta())).reshape(weight.shape).to(weight.dtype))
                count += 1
    return count


def e2e_feeds(model, seeds: int, timesteps: list[float], dtype, lat: int) -> list[tuple[int, dict]]:
    """(seed, UNet inputs) for every seed and timestep: batch 2, a ``lat`` x ``lat`` latent, 16 tokens."""
    import torch

    from .export import unet_example_inputs

    feeds = []
    for seed in range(seeds):
        base = unet_example_inputs(model, batch=2, height=lat, width=lat, text_len=16, seed=seed, dtype=dtype)
        feeds += [(seed, dict(base, timestep=torch.tensor(float(t)))) for t in timesteps]
    return feeds


def verify_export(out: str | Path, steps: int = 4, seeds: int = 3, quiet: bool = False, model=None,
                  layers: bool = True, optimize: bool = False, graphs: Sequence[str] | None = None) -> dict:
    """Run the checks, write the reports, record them in the manifest; returns the report dict.

    steps: timesteps per seed (spread over the schedule); seeds: input sets; optimize: ONNX
    Runtime's graph optimizations on (they reorder float arithmetic; the criterion must hold);
    graphs: which of the export's ONNX graphs (:data:`GRAPHS`) run end to end (None: all; one
    graph at a time is in memory, the full SDXL plugin graph took over 15 GB in ONNX Runtime)."""
    import torch

    from .checkpoint import load_checkpoint
    from .export import ExportError, add_debug_outputs, find_adapter_table, unet_call
    from .parity import (LoadedWhileRunning, e2e_timesteps, end_to_end, judge_end_to_end, new_session,
                         parity_at_timesteps)
    from .pipeline import MANIFEST, _read_loras, model_preset, read_manifest

    out = Path(out)
    manifest = read_manifest(out)
    say = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    for name, value in (("--steps", steps), ("--seeds", seeds)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"verify {name} must be a positive integer, got {value!r}")
    t0 = time.perf_counter()
    arts = manifest["artifacts"]
    targets = {t: out / arts[f"{t}_onnx"] for t in GRAPHS if arts.get(f"{t}_onnx")}
    if not targets:
        raise UserError(f"{out}: the manifest lists no reference/plugin ONNX to verify", EXIT_INPUT)
    if graphs is not None:
        unknown = sorted(set(graphs) - set(targets))
        if unknown or not graphs:
            raise UserError(f"verify --graphs {','.join(graphs)}: this export has {', '.join(targets)} "
                            f"(choose from those)", EXIT_INPUT)
        targets = {t: p for t, p in targets.items() if t in graphs}
    ckpt = Path(arts["checkpoint"]) if Path(arts["checkpoint"]).is_absolute() else out / arts["checkpoint"]
    preset = model_preset(manifest["model"], quantized=ckpt)
    loras = _read_loras([l["file"] for l in manifest.get("loras", [])], preset)
    if model is None or next(model.parameters()).dtype != torch.float32 or loras:
        model = load_checkpoint(ckpt, preset=preset)
    model.eval()
    apply_user_loras(model, loras)
    half = manifest["inputs"][0]["dtype"] == "float16"
    if half:  # an fp16 export is compared with the fp16 model (scales stay fp32, as exported)
        from .export import to_fp16

        to_fp16(model)
    dtype = torch.float16 if half else torch.float32
    lat = 2 * 2 ** (len(model.config.block_out_channels) - 1)
    runners = {t: LoadedWhileRunning(p, optimize=optimize) for t, p in targets.items()}
    engine_run, engine_why = (None, "no engine in this export")
    if arts.get("engine"):
        engine_run, engine_why = _engine_runner(out / arts["engine"])
    if engine_run:
        runners["engine"] = lambda f: engine_run({k: v.numpy() for k, v in f.items()})
    table = find_adapter_table(model)
    timesteps = e2e_timesteps(table, steps, preset.scheduler.get("num_train_timesteps", 1000))
    feeds = e2e_feeds(model, seeds, timesteps, dtype, lat)
    say(f"[verify] end to end: PyTorch vs {', '.join(runners)} on {len(feeds)} inputs ({seeds} seeds x "
        f"{len(timesteps)} timesteps)" + ("" if engine_run else f" (engine: {engine_why})"))
    samples = end_to_end(model, runners, feeds, call=unet_call, adapter_table=table)
    # fp32 ONNX Runtime reproduces PyTorch's arithmetic; fp16 graphs and engines round otherwise
    checks = {name: judge_end_to_end(s, exact=name != "engine" and not half) for name, s in samples.items()}
    layer_rows = []
    if layers:
        say("[verify] layer by layer (the export with every layer's values as outputs)")
        from graph_passes.targets import build_target

        debug, lowered = out / "verify" / "debug.onnx", out / "verify" / "debug.reference.onnx"
        try:
            try:  # the export itself, not a new one: the layers' values become graph outputs
                add_debug_outputs(out / arts["export_onnx"], debug)
            except ExportError as err:
                raise UserError(str(err), EXIT_INPUT) from None
            # ONNX Runtime loads a UNet whose op bodies are inlined generically (~100 k nodes) only
            # after many minutes: run the debug export's exact reference lowering (docs/targets.md)
            build_target(debug, "reference", lowered, quiet=True, user_loras=loras)
            base = dict(feeds[0][1])
            ts = sorted({timesteps[0], timesteps[-1], 500.0})
            session = new_session(lowered)  # not cached: the file is scratch
            for t, rep in parity_at_timesteps(model, session, base, ts, call=unet_call).items():
                for lp in rep.layers:
                    layer_rows.append({"timestep": t, "layer": lp.name, "rel_l2": lp.out.rel_l2,
                                       "codes_differ": lp.codes_differ_fraction, "max_abs": lp.out.max_abs})
        finally:  # the debug graphs are scratch files, also when a check fails
            for path in (debug, lowered):
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".data").unlink(missing_ok=True)
    worst_codes = max((r["codes_differ"] for r in layer_rows), default=0.0)
    worst_layer = max(layer_rows, key=lambda r: r["codes_differ"], default=None)
    worst_out = max(layer_rows, key=lambda r: r["rel_l2"], default=None)
    failed = [f"{t} {c.line()}" for t, cs in checks.items() for c in cs if not c.passed]
    if worst_codes > CODES_DIFFER_TOL:
        failed.append(f"per-layer codes: {worst_codes:.2e} of the codes differ in {worst_layer['layer']} "
                      f"at t={worst_layer['timestep']:g} (limit {CODES_DIFFER_TOL:g})")
    if worst_out and worst_out["rel_l2"] > LAYER_OUT_TOL:
        failed.append(f"per-layer output: {worst_out['layer']} differs from PyTorch by rel L2 "
                      f"{worst_out['rel_l2']:.2e} at t={worst_out['timestep']:g} on the same input "
                      f"(limit {LAYER_OUT_TOL:g})")
    passed = not failed
    worst_div = max((s.divergence / max(s.quant_err, 1e-30) for ss in samples.values() for s in ss), default=0.0)
    report = {"passed": passed, "failed": failed,
              "tolerances": {"codes_differ": CODES_DIFFER_TOL, "layer_out_rel_l2": LAYER_OUT_TOL,
                             "quality": "1 +- 0.05 (fp16 graphs and engines: 0.10)",
                             "divergence": "<= 1 x quantization error (fp16 graphs and engines: sqrt 2)",
                             "agreement": "an input within 1e-4 of PyTorch per TALoRA adapter (fp32 "
                             "ONNX Runtime targets)"},
              "checks": {t: [c.__dict__ for c in cs] for t, cs in checks.items()},
              "worst_divergence": worst_div, "worst_codes_differ": worst_codes,
              "worst_layer_out_rel_l2": worst_out["rel_l2"] if worst_out else 0.0,
              "samples": [dict(target=t, **s.__dict__, rel_divergence=s.rel_divergence, agrees=s.agrees)
                          for t, ss in samples.items() for s in ss],
              "layers": layer_rows, "engine": "compared" if engine_run else f"not run: {engine_why}",
              "ort_optimizations": optimize, "graphs": list(targets),
              "seconds": round(time.perf_counter() - t0, 1)}
    vdir = out / "verify"
    atomic_write_json(vdir / "verify.json", report)
    atomic_write_text(vdir / "verify.md", _markdown(manifest, report))
    _plot(layer_rows, vdir / "verify.png")
    manifest["verify"] = {"passed": passed, "failed": failed, "graphs": list(targets),
                          "worst_divergence": worst_div, "worst_codes_differ": worst_codes,
                          "files": ["verify/verify.json", "verify/verify.md", "verify/verify.png"]}
    atomic_write_json(out / MANIFEST, manifest)
    summary = "; ".join(f"{t}: " + ", ".join(f"{c.name} {c.value:.3g}" for c in cs) for t, cs in checks.items())
    say(f"[verify] {'PASSED' if passed else 'FAILED'}: {summary}; worst per-layer codes differing "
        f"{worst_codes:.2e} (tol {CODES_DIFFER_TOL:g}), worst layer output rel L2 "
        f"{report['worst_layer_out_rel_l2']:.2e} (tol {LAYER_OUT_TOL:g}); {vdir / 'verify.md'}")
    for line in failed:
        say(f"[verify] failed: {line}")
    return report


def _markdown(manifest: dict, r: dict) -> str:
    lines = [f"# verify: {manifest['model']} {manifest.get('scheme', '')}", "",
             f"**{'PASSED' if r['passed'] else 'FAILED'}**. TensorRT engine: {r['engine']}. ONNX Runtime "
             f"graph optimizations: {'on' if r['ort_optimizations'] else 'off'}.", ""]
    lines += [f"- failed: {f}" for f in r["failed"]] + ([""] if r["failed"] else [])
    lines += ["## End to end, against the quantization error (docs/parity.md)", "",
              "| target | check | value | limit | result | where |", "|---|---|---:|---|---|---|"]
    lines += [f"| {t} | {c['name']} | {c['value']:.4g} | {c['limit']} | {'ok' if c['passed'] else 'FAILED'} | "
              f"{'' if c['passed'] else c['where']} |" for t, cs in r["checks"].items() for c in cs]
    lines += ["", "| target | seed | timestep | adapter | quantization error | runtime vs fp | runtime vs PyTorch "
              "| rel | agrees |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {s['target']} | {s['seed']} | {s['timestep']:.0f} | {'' if s['adapter'] is None else s['adapter']} "
              f"| {s['quant_err']:.4g} | {s['runtime_err']:.4g} | {s['divergence']:.4g} | {s['rel_divergence']:.2e} "
              f"| {'yes' if s['agrees'] else 'no'} |" for s in r["samples"]]
    if r["layers"]:
        worst = sorted(r["layers"], key=lambda x: (-x["codes_differ"], -x["rel_l2"]))[:15]
        lines += ["", f"## Layer by layer on the same input ({len(r['layers'])} layer-timestep pairs; worst 15; "
                  f"codes may differ in at most {r['tolerances']['codes_differ']:g} of a layer, its output "
                  f"by rel L2 {r['tolerances']['layer_out_rel_l2']:g})", "",
                  "| timestep | layer | codes differing | rel L2 | max abs |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {x['timestep']:.0f} | {x['layer']} | {x['codes_differ']:.2e} | {x['rel_l2']:.2e} | "
                  f"{x['max_abs']:.2e} |" for x in worst]
    lines += ["", "![per-layer error](verify.png)", ""]
    return "\n".join(lines)


def _plot(layer_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    if layer_rows:
        for t in sorted({r["timestep"] for r in layer_rows}):
            ys = [max(r["rel_l2"], 1e-12) for r in layer_rows if r["timestep"] == t]
            ax.semilogy(range(len(ys)), ys, ".-", label=f"t={t:.0f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("quantized layer (graph order)")
    ax.set_ylabel("rel L2, ONNX Runtime vs PyTorch")
    ax.set_title("Per-layer error on the same input")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
