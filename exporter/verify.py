"""`export-engine verify OUT`: PyTorch vs ONNX Runtime (reference and plugin graphs) vs TensorRT.

End to end: a short sampler run (the preset's scheduler, a few steps from a seeded latent); at
every step PyTorch and each ONNX target get the same input, and the latent advances with
PyTorch's prediction. Layer by layer: a debug export of the same checkpoint exposes every
quantized layer's activation input, codes and output, and each layer is compared on the same
input (:mod:`exporter.parity`). Writes OUT/verify/verify.{json,md,png}.

Tolerances (docs/parity.md): whole-model relative L2 <= 1e-3 per step and target; per layer at
most 0.01 % of activation codes may differ (a code can only flip where fp32 evaluation order moves
a value across a rounding midpoint).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .atomic import atomic_path, atomic_write_json, atomic_write_text
from .cli import EXIT_INPUT, UserError

REL_L2_TOL = 1e-3
CODES_DIFFER_TOL = 1e-4


def _scheduler(preset, steps: int):
    from .calibration import make_scheduler

    sched = make_scheduler("euler", preset.scheduler)
    sched.set_timesteps(steps)
    return sched


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
            t = torch.from_numpy(np.ascontiguousarray(value)).cuda()
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


def verify_export(out: str | Path, steps: int = 3, quiet: bool = False, model=None,
                  layers: bool = True) -> dict:
    """Run the checks, write the reports, record them in the manifest; returns the report dict."""
    import torch

    from .checkpoint import load_checkpoint
    from .export import export_unet, unet_call, unet_example_inputs
    from .parity import diff, ort_session, parity_at_timesteps, run_onnx
    from .pipeline import MANIFEST, _preset, read_manifest

    out = Path(out)
    manifest = read_manifest(out)
    say = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    t0 = time.perf_counter()
    preset = _preset(manifest["model"])
    arts = manifest["artifacts"]
    ckpt = Path(arts["checkpoint"]) if Path(arts["checkpoint"]).is_absolute() else out / arts["checkpoint"]
    if model is None or next(model.parameters()).dtype != torch.float32:
        model = load_checkpoint(ckpt, preset=preset)
    model.eval()
    half = manifest["inputs"][0]["dtype"] == "float16"
    if half:  # an fp16 export is compared with the fp16 model (scales stay fp32, as exported)
        from .export import to_fp16

        to_fp16(model)
    dtype = torch.float16 if half else torch.float32
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    lat = 2 * factor
    base = unet_example_inputs(model, batch=2, height=lat, width=lat, text_len=16, seed=1, dtype=dtype)
    sched = _scheduler(preset, steps)
    latent = base["sample"].float() * sched.init_noise_sigma
    targets = {t: out / arts[f"{t}_onnx"] for t in ("reference", "plugin") if arts.get(f"{t}_onnx")}
    if not targets:
        raise UserError(f"{out}: the manifest lists no reference/plugin ONNX to verify", EXIT_INPUT)
    sessions = {t: ort_session(p) for t, p in targets.items()}
    engine_run, engine_why = (None, "no engine in this export")
    if arts.get("engine"):
        engine_run, engine_why = _engine_runner(out / arts["engine"])
    rows = []
    say(f"[verify] {steps} sampler steps: PyTorch vs {', '.join(targets)}"
        + ("" if engine_run else f" (engine: {engine_why})"))
    from .export import _talora_hooks_detached, find_adapter_table
    from .parity import _set_torch_adapter

    table = find_adapter_table(model)
    for step, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(latent, t)
        feeds = dict(base, sample=x_in.to(dtype), timestep=torch.tensor(float(t)))
        _set_torch_adapter(model, table, feeds["timestep"])
        with torch.no_grad(), _talora_hooks_detached(model):
            ref = model(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"],
                        added_cond_kwargs={k: feeds[k] for k in ("text_embeds", "time_ids") if k in feeds}
                        or None).sample
        for name, sess in sessions.items():
            got = run_onnx(sess, feeds)
            d = diff(next(iter(got.values())).astype(np.float32), ref.float().numpy())
            rows.append({"step": step, "timestep": float(t), "target": name, "max_abs": d.max_abs,
                         "rel_l2": d.rel_l2})
        if engine_run:
            d = diff(engine_run({k: v.numpy() for k, v in feeds.items()}), ref.float().numpy())
            rows.append({"step": step, "timestep": float(t), "target": "engine", "max_abs": d.max_abs,
                         "rel_l2": d.rel_l2})
        latent = sched.step(ref.float(), t, latent.float()).prev_sample
    layer_rows = []
    if layers:
        say("[verify] layer by layer (debug export of the same checkpoint)")
        from graph_passes.targets import build_target

        debug, lowered = out / "verify" / "debug.onnx", out / "verify" / "debug.reference.onnx"
        try:
            export_unet(model, debug, batch=2, height=lat, width=lat, text_len=16, debug_outputs=True)
            # ONNX Runtime loads a UNet whose op bodies are inlined generically (~100 k nodes) only
            # after many minutes: run the debug export's exact reference lowering (docs/targets.md)
            build_target(debug, "reference", lowered, quiet=True)
            ts = sorted({float(sched.timesteps[0]), float(sched.timesteps[-1]), 500.0})
            for t, rep in parity_at_timesteps(model, lowered, base, ts, call=unet_call).items():
                for lp in rep.layers:
                    layer_rows.append({"timestep": t, "layer": lp.name, "rel_l2": lp.out.rel_l2,
                                       "codes_differ": lp.codes_differ_fraction, "max_abs": lp.out.max_abs})
        finally:  # the debug graphs are scratch files, also when a check fails
            for path in (debug, lowered):
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".data").unlink(missing_ok=True)
    worst_e2e = max((r["rel_l2"] for r in rows if r["target"] != "engine"), default=0.0)
    worst_codes = max((r["codes_differ"] for r in layer_rows), default=0.0)
    passed = worst_e2e <= REL_L2_TOL and worst_codes <= CODES_DIFFER_TOL
    if engine_run:
        passed = passed and max(r["rel_l2"] for r in rows if r["target"] == "engine") <= 1e-2
    report = {"passed": passed, "tolerances": {"rel_l2": REL_L2_TOL, "codes_differ": CODES_DIFFER_TOL},
              "worst_rel_l2": worst_e2e, "worst_codes_differ": worst_codes, "steps": rows,
              "layers": layer_rows, "engine": "compared" if engine_run else f"not run: {engine_why}",
              "seconds": round(time.perf_counter() - t0, 1)}
    vdir = out / "verify"
    atomic_write_json(vdir / "verify.json", report)
    atomic_write_text(vdir / "verify.md", _markdown(manifest, report))
    _plot(layer_rows, vdir / "verify.png")
    manifest["verify"] = {"passed": passed, "worst_rel_l2": worst_e2e, "worst_codes_differ": worst_codes,
                          "files": ["verify/verify.json", "verify/verify.md", "verify/verify.png"]}
    atomic_write_json(out / MANIFEST, manifest)
    say(f"[verify] {'PASSED' if passed else 'FAILED'}: worst end-to-end rel L2 {worst_e2e:.2e} "
        f"(tol {REL_L2_TOL:g}), worst per-layer codes differing {worst_codes:.2e} (tol {CODES_DIFFER_TOL:g}); "
        f"{vdir / 'verify.md'}")
    return report


def _markdown(manifest: dict, r: dict) -> str:
    lines = [f"# verify: {manifest['model']} {manifest.get('scheme', '')}", "",
             f"**{'PASSED' if r['passed'] else 'FAILED'}**: worst end-to-end relative L2 "
             f"{r['worst_rel_l2']:.3e} (tolerance {r['tolerances']['rel_l2']:g}); worst fraction of "
             f"activation codes differing in a layer {r['worst_codes_differ']:.3e} (tolerance "
             f"{r['tolerances']['codes_differ']:g}). TensorRT engine: {r['engine']}.", "",
             "## End to end (sampler steps)", "", "| step | timestep | target | max abs | rel L2 |",
             "|---:|---:|---|---:|---:|"]
    lines += [f"| {s['step']} | {s['timestep']:.1f} | {s['target']} | {s['max_abs']:.3e} | {s['rel_l2']:.3e} |"
              for s in r["steps"]]
    if r["layers"]:
        worst = sorted(r["layers"], key=lambda x: -x["rel_l2"])[:15]
        lines += ["", f"## Layer by layer ({len(r['layers'])} layer-timestep pairs; worst 15 by rel L2)", "",
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
        ax.axhline(REL_L2_TOL, color="red", lw=0.8, ls="--", label="tolerance")
        ax.legend(fontsize=8)
    ax.set_xlabel("quantized layer (graph order)")
    ax.set_ylabel("rel L2, ONNX Runtime vs PyTorch")
    ax.set_title("Per-layer error on the same input")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
