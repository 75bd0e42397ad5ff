"""The main job: MODEL -> quantize -> export -> passes -> engine -> verify, staged and cached.

Every stage's result lives in the out dir under a content hash of its inputs and options
(:mod:`exporter.stages`): a rerun skips finished stages, ``force`` redoes them, and a changed
option redoes only the stages that depend on it. ``manifest.json`` describes the export.

    OUT/checkpoint/quantized.{json,safetensors}   quantize   (or --quantized CKPT)
    OUT/onnx/unet.onnx[.data]                     export     (QuantizeFP/DequantizeFP ops)
    OUT/reference.onnx, plugin.onnx, <build target>.onnx   passes  (+ OUT/reports/passes_*.json)
    OUT/engine/unet_<target>_sm<cc>.engine        build      (TensorRT or TensorRT-RTX;
                                                  + OUT/reports/engine_layers.{json,md})
    OUT/verify/verify.{json,md,png}               verify
    OUT/manifest.json
"""
from __future__ import annotations

import importlib.util
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .atomic import atomic_write_json, check_writable_dir, remove_stale_partials, sha256_file
from .cli import EXIT_INPUT, EXIT_MISSING_TOOL, EXIT_OUTPUT, EXIT_TOLERANCE, UserError
from .stages import StageCache, file_fingerprint, run_in_child, stage_key

PIPELINE_VERSION = 1  # bump when a stage's output format changes: invalidates caches
MANIFEST = "manifest.json"
TARGETS = ("reference", "plugin", "fp8", "native")  # graph_passes.targets.TARGETS (a test checks)
#: compute capabilities from which TensorRT-RTX's default build is `native` (Blackwell: FP4)
NATIVE_MIN_SM = 100
#: models above this size are not verified by the main command (run `export-engine verify`)
VERIFY_AUTO_MAX_PARAMS = 200_000_000
#: models above this size are exported in fp16 unless --fp32: a 2.6 B-parameter UNet is 10 GB in fp32
FP16_AUTO_MIN_PARAMS = 1_000_000_000
#: models above this size run each stage in a child process (see stages.run_in_child): SDXL's
#: quantize (~12 GB), passes and TensorRT build (~17 GB) then peak one at a time, not summed
ISOLATE_AUTO_MIN_PARAMS = 1_000_000_000
#: disk the main job writes per model parameter: the full SDXL out dir (checkpoint, fp16 export,
#: reference and plugin targets, SM89 engine) held 21 GiB for 2.57 B parameters
DISK_BYTES_PER_PARAM = 9


@dataclass
class RunOptions:
    model: str
    scheme: str = "w4a4"
    model_path: str | None = None
    loras: list[str] = field(default_factory=list)
    quantized: str | None = None
    target: str | None = None
    sm: int | None = None
    out: str | None = None
    build: bool = True
    force: bool = False
    quiet: bool = False
    verify: bool | None = None
    fp16: bool | None = None  # None: fp16 for models over FP16_AUTO_MIN_PARAMS (memory), else fp32
    # quantization (None: the preset's defaults)
    calib_samples: int | None = None
    calib_steps: int | None = None
    finetune_steps: int | None = None
    nvfp4: bool = False  # Linear layers quantized the NVFP4 way (quantize.QuantizeConfig.nvfp4)
    keep_fp_shortcuts: bool = True  # last up block's conv_shortcut kept FP (QuantizeConfig.keep_fp_shortcuts)
    a8_budget: float = 0.0  # share of the MACs with 8-bit activations (QuantizeConfig.a8_budget)
    a8_convs: bool = False  # every convolution with 8-bit activations (QuantizeConfig.a8_convs)
    gptq: bool | None = None  # GPTQ weight rounding (QuantizeConfig.gptq; None: automatic)
    calib_embeddings: str | None = None  # .safetensors of text embeddings (calibration.text_conditioning)
    seed: int = 0
    threads: int | None = None  # torch threads for the quantize math (None: quantize.DEFAULT_THREADS)
    # engine profiles: images per batch (classifier-free guidance doubles the UNet batch)
    batch: tuple[int, int, int] = (1, 1, 4)
    resolution: tuple[int, int, int] | None = None  # pixels (min, opt, max); None: preset default
    text_len: tuple[int, int, int] = (77, 77, 77)
    cfg: bool = True
    isolate: bool | None = None  # stages in child processes; None: for models over ISOLATE_AUTO_MIN_PARAMS

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"models/{self.model}-{self.scheme}")


class Progress:
    """Stage lines with timings; silent with quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def stage(self, name: str, result) -> None:
        how = "cached" if result.cached else f"{result.seconds:.1f} s"
        self(f"[{name}] {'done' if not result.cached else 'up to date'} ({how})")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _default_threads() -> int:
    from .quantize import DEFAULT_THREADS  # torch is imported only when a stage needs it

    return DEFAULT_THREADS


def _path_fingerprint(path: str | None) -> dict | None:
    """Identity of a weights file or folder (sizes and mtimes of the files in it)."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise UserError(f"--model-path {p} does not exist; give a diffusers folder (with unet/) or a "
                        ".safetensors checkpoint", EXIT_INPUT)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return {"path": str(p.resolve()), "files": [file_fingerprint(f) for f in files[:200]]}


def _preset(name: str):
    from .models import PRESETS

    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)} "
                        "(see `export-engine list`)", EXIT_INPUT)
    return PRESETS[name]


def model_preset(name: str, model_path: str | None = None, quantized: str | Path | None = None):
    """The preset for this run: a quantized checkpoint's own model, else a diffusers folder's
    config (``--model-path DIR``), else the named preset's bundled architecture."""
    preset = _preset(name)
    if quantized:
        from .checkpoint import read_checkpoint_config

        return preset.for_checkpoint(read_checkpoint_config(quantized)[0])
    return preset.for_model_path(model_path)


def _embeddings_fingerprint(path: str | None, preset) -> str | None:
    """sha256 of a --calib-embeddings file, checked against the model first (one-line errors)."""
    if path is None:
        return None
    from .calibration import text_conditioning

    if not Path(path).is_file():
        raise UserError(f"--calib-embeddings {path} does not exist; make it as README.md (own weights) "
                        "shows", EXIT_INPUT)
    text_conditioning(preset, 1, path, 0)
    return sha256_file(path)


def _read_loras(specs: list[str], preset) -> list[tuple[str, dict]]:
    from graph_passes.lora_files import LoraFileError, parse_lora_arg, read_lora_file

    out = []
    for spec in specs:
        try:
            path, scale = parse_lora_arg(spec)
            out.append((str(path), read_lora_file(path, scale, unet_config=preset.config())))
        except LoraFileError as err:
            raise UserError(str(err), EXIT_INPUT) from None
    return out


def check_loras_fit(loras: list[tuple[str, dict]], preset) -> None:
    """Every LoRA key must name a Linear/Conv2d of the model with the right shape: checked on the
    meta-device model before any stage runs, so a bad file changes nothing on disk."""
    from torch import nn

    from graph_passes.lora_files import LoraFileError, check_against_layers

    shapes = {name: (m.weight.shape[0], m.weight[0].numel()) for name, m in
              preset.build_empty().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for path, deltas in loras:
        try:
            check_against_layers(deltas, shapes, path)
        except LoraFileError as err:
            raise UserError(str(err), EXIT_INPUT) from None


def _lora_fingerprints(specs: list[str]) -> list:
    from graph_passes.lora_files import parse_lora_arg

    fps = []
    for spec in specs:
        path, scale = parse_lora_arg(spec)
        if not path.is_file():
            raise UserError(f"LoRA file {path} does not exist", EXIT_INPUT)
        fps.append({"sha256": sha256_file(path), "scale": scale})
    return fps


def code_fingerprint(*packages: str, exclude: tuple[str, ...] = ()) -> str:
    """Hash of the source of the packages a stage runs, so a new version of the code redoes the
    stages it affects (and only those)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in packages:
        for f in sorted((root / pkg).glob("**/*.py")):
            if f.name not in exclude:
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


#: modules that do not change what quantize/export produce
_ORCHESTRATION = ("pipeline.py", "pipeline_cli.py", "verify.py", "cli.py", "stages.py",
                  "quantize_cli.py", "export_cli.py", "engine.py")


def _rel(out: Path, p: Path | str | None) -> str | None:
    return None if p is None else str(Path(p).resolve().relative_to(out.resolve()))


def profiles_for(preset, opts: RunOptions) -> dict:
    """{input: (min, opt, max)} for the engine, and the example shape, from the options."""
    from .engine import unet_profile

    cfg = preset.config()
    mult = 2 if opts.cfg else 1
    batch = tuple(b * mult for b in opts.batch)
    res = opts.resolution or (cfg["sample_size"] * 8 // 2, cfg["sample_size"] * 8, cfg["sample_size"] * 8)
    latent = tuple(r // 8 for r in res)
    return unet_profile(batch, latent, opts.text_len, cfg["in_channels"], cfg["cross_attention_dim"],
                        preset.text_embeds_dim if cfg.get("addition_embed_type") == "text_time" else None)


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------
def quantize_stage(model_name: str, cfg, model_path: str | None, checkpoint_dir: Path, quiet: bool,
                   keep: bool = True):
    """Quantize the model and save its checkpoint; returns the quantized model when ``keep``."""
    import warnings

    from .checkpoint import save_checkpoint
    from .quantize import quantize_model

    say = Progress(quiet)
    with warnings.catch_warnings():  # the random-weights warning is printed once, by run()
        warnings.simplefilter("ignore")
        model, report = quantize_model(_preset(model_name), cfg, model_path=model_path, progress=say)
    say(report.summary())
    save_checkpoint(model, checkpoint_dir, report)
    return model if keep else None


def export_stage(checkpoint: Path, model_name: str, onnx_path: Path, text_len: int, fp16: bool,
                 model=None) -> bool:
    """Export the checkpoint's model (or ``model``, already loaded) to ONNX; True when the
    weights went to an external data file."""
    from .checkpoint import load_checkpoint
    from .export import ExportError, export_unet

    if model is None:
        model = load_checkpoint(checkpoint, preset=_preset(model_name))
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    try:
        res = export_unet(model, onnx_path, batch=2, height=2 * factor, width=2 * factor,
                          text_len=text_len, fp16=fp16)
    except ExportError as err:
        raise UserError(str(err), EXIT_INPUT) from None
    return res.data_path is not None


class Pipeline:
    def __init__(self, opts: RunOptions):
        self.opts = opts
        self.out = opts.out_dir
        self.say = Progress(opts.quiet)
        self.preset = model_preset(opts.model, opts.model_path, opts.quantized)
        try:
            check_writable_dir(self.out)
        except PermissionError as err:
            raise UserError(str(err), EXIT_OUTPUT) from None
        remove_stale_partials(self.out)
        self.cache = StageCache(self.out, force=opts.force)
        self.model = None  # the quantized torch model when this process made or loaded it
        self.timings: dict[str, float] = {}
        self.params = _param_count(self.preset)  # sizes the defaults below
        if opts.fp16 is None:
            opts.fp16 = self.params >= FP16_AUTO_MIN_PARAMS
        if opts.isolate is None:
            opts.isolate = self.params >= ISOLATE_AUTO_MIN_PARAMS

    def _call(self, fn: Callable, /, *args, **kwargs):
        """A stage's work: in a child process with ``isolate``, else here."""
        return run_in_child(fn, *args, **kwargs) if self.opts.isolate else fn(*args, **kwargs)

    # -- quantize ------------------------------------------------------------------------------
    def quantize(self) -> tuple[str, Path]:
        o = self.opts
        if o.quantized:
            from .checkpoint import read_checkpoint_config

            _, folder = read_checkpoint_config(o.quantized)  # load_checkpoint checks the model later
            json_path = Path(o.quantized) if Path(o.quantized).is_file() else folder / "quantized.json"
            return stage_key("checkpoint", file_fingerprint(json_path)), json_path
        key = stage_key("quantize", PIPELINE_VERSION, code_fingerprint("exporter", exclude=_ORCHESTRATION),
                        o.model, o.scheme, _path_fingerprint(o.model_path), o.calib_samples,
                        o.calib_steps, o.finetune_steps, o.seed, o.nvfp4, o.threads or _default_threads(),
                        _embeddings_fingerprint(o.calib_embeddings, self.preset), o.keep_fp_shortcuts,
                        o.a8_budget, o.a8_convs, o.gptq)

        def produce():
            from .quantize import QuantizeConfig

            cfg = QuantizeConfig(scheme=o.scheme, calib_samples=o.calib_samples, calib_steps=o.calib_steps,
                                 finetune_steps=o.finetune_steps, nvfp4=o.nvfp4, seed=o.seed,
                                 threads=o.threads, calib_embeddings=o.calib_embeddings,
                                 keep_fp_shortcuts=o.keep_fp_shortcuts, a8_budget=o.a8_budget,
                                 a8_convs=o.a8_convs, gptq=o.gptq)
            self.model = self._call(quantize_stage, o.model, cfg, o.model_path, self.out / "checkpoint",
                                    o.quiet, keep=not o.isolate)
            return ["checkpoint/quantized.json", "checkpoint/quantized.safetensors"]

        self.say(f"[quantize] {o.model} {o.scheme}")
        res = self.cache.run("quantize", key, produce)
        self.say.stage("quantize", res)
        self.timings["quantize"] = res.seconds
        return key, self.out / "checkpoint" / "quantized.json"

    def load_model(self, checkpoint: Path):
        if self.model is None:
            from .checkpoint import load_checkpoint

            self.model = load_checkpoint(checkpoint, preset=self.preset)
        return self.model

    # -- export --------------------------------------------------------------------------------
    def export(self, upstream: str, checkpoint: Path) -> tuple[str, Path]:
        key = stage_key("export", PIPELINE_VERSION, code_fingerprint("exporter", exclude=_ORCHESTRATION),
                        upstream, self.opts.fp16)
        onnx_path = self.out / "onnx" / "unet.onnx"

        def produce():
            model = None if self.opts.isolate else self.load_model(checkpoint)
            data = self._call(export_stage, checkpoint, self.opts.model, onnx_path, self.opts.text_len[1],
                              self.opts.fp16, model)
            if self.opts.fp16:  # the torch model is now fp16: reload for verify
                self.model = None
            return ["onnx/unet.onnx"] + (["onnx/unet.onnx.data"] if data else [])

        self.say("[export] ONNX with export_engine QuantizeFP/DequantizeFP ops")
        res = self.cache.run("export", key, produce)
        self.say.stage("export", res)
        self.timings["export"] = res.seconds
        return key, onnx_path

    # -- passes --------------------------------------------------------------------------------
    def targets_to_make(self) -> list[str]:
        """reference and plugin (verify runs both) and the target the build step will use."""
        want = ["reference", "plugin"]
        build = self.opts.target or default_rtx_target(self.opts.sm or 89)
        if build not in want:
            want.append(build)
        return want

    def passes(self, upstream: str, onnx_path: Path) -> tuple[str, dict]:
        from graph_passes.targets import build_target

        targets = self.targets_to_make()
        key = stage_key("passes", PIPELINE_VERSION, code_fingerprint("graph_passes"), upstream,
                        _lora_fingerprints(self.opts.loras), targets)

        def produce():
            loras = _read_loras(self.opts.loras, self.preset)
            written = []
            for target in targets:
                self.say(f"[passes] {target} target")
                out = self.out / f"{target}.onnx"
                try:
                    info = self._call(build_target, onnx_path, target, out, user_loras=loras,
                                      quiet=self.opts.quiet)
                except ValueError as err:  # a LoRA that does not fit, a graph we cannot lower
                    raise UserError(f"graph passes ({target}): {err}", EXIT_INPUT) from None
                if target == "native":
                    nv = sum(1 for r in info["layers"] if r.get("impl") == "nvfp4")
                    self.say(f"[passes] native: {nv} of {len(info['layers'])} quantized layers are NVFP4"
                             + ("" if self.opts.nvfp4 else " (--nvfp4 quantizes Linear layers the NVFP4 way)"))
                report = self.out / "reports" / f"passes_{target}.json"
                atomic_write_json(report, info)
                written += [f"{target}.onnx", f"reports/passes_{target}.json"]
                if info["data"]:
                    written.append(f"{target}.onnx.data")
            return written

        res = self.cache.run("passes", key, produce)
        self.say.stage("passes", res)
        self.timings["passes"] = res.seconds
        return key, {t: self.out / f"{t}.onnx" for t in targets}

    # -- build ---------------------------------------------------------------------------------
    def choose_backend(self, explicit: bool) -> tuple[str | None, str | None, int | None, str]:
        """(trt module, target, sm, why) or (None, None, None, why-not)."""
        o = self.opts
        if has_module("tensorrt") and cuda_available():
            return "tensorrt", o.target or "plugin", None, "TensorRT on this GPU"
        if has_module("tensorrt_rtx"):
            sm = o.sm or 89
            target = o.target or default_rtx_target(sm)
            check_rtx_target(target, sm)
            return "tensorrt_rtx", target, sm, f"TensorRT-RTX for SM{sm} (CPU build)"
        why = ("no TensorRT: neither `tensorrt` (with a CUDA GPU) nor `tensorrt_rtx` can be imported. "
               "Install tensorrt-rtx-cu13 to build here, or on a GPU host with TensorRT run "
               f"`export-engine build {self.out}`")
        if explicit:
            raise UserError(why, EXIT_MISSING_TOOL)
        return None, None, None, why

    def build(self, upstream: str, onnx_files: dict, explicit: bool = False) -> dict | None:
        module, target, sm, why = self.choose_backend(explicit)
        if module is None:
            self.say(f"[build] skipped: {why}")
            return None
        if target not in onnx_files:
            raise UserError(f"--target {target}: this export has no {target}.onnx (made: "
                            f"{', '.join(onnx_files)}); rerun with --target {target}", EXIT_INPUT)
        profile = profiles_for(self.preset, self.opts)
        plugin_libs: list[str] = []
        if module == "tensorrt" and target == "plugin":
            from plugins.loader import load_plugin, plugin_library_path

            load_plugin()
            plugin_libs = [str(plugin_library_path())]
        name = f"unet_{target}" + (f"_sm{sm}" if sm else "") + ".engine"
        engine = self.out / "engine" / name
        key = stage_key("build", PIPELINE_VERSION, upstream, module, target, sm, profile, _versions().get(module))

        def produce():
            self.say(f"[build] {target} target with {why}: "
                     + {"reference": "FP4 numerics as standard ops (table decode, no FP4 hardware type)",
                        "plugin": "FP4Gemm plugin kernels (FP8/FP16 tensor cores)",
                        "fp8": "every quantized Linear/Conv on FP8 tensor cores (4-bit values exact in E4M3)",
                        "native": "NVFP4 (FLOAT4E2M1) where expressible, FP8 for the other layers"}[target])
            timing = Path("models") / "timing.cache" if module == "tensorrt" else None
            passes_report = self.out / "reports" / f"passes_{target}.json"
            self._call(build_engine_with_report, onnx_files[target], engine, self.out / "reports",
                       passes_report if passes_report.is_file() else None, sm=sm, profiles=profile,
                       plugin_libs=plugin_libs, quiet=self.opts.quiet, timing_cache=timing, trt_module=module)
            return [str(engine.relative_to(self.out)), "reports/engine_layers.json", "reports/engine_layers.md"]

        res = self.cache.run("build", key, produce)
        self.say.stage("build", res)
        self.timings["build"] = res.seconds
        layers = self.out / "reports" / "engine_layers.json"
        if layers.is_file():
            from .engine_report import summary_line

            report = json.loads(layers.read_text())
            self.say(f"[build] {summary_line(report)}")
            self.estimate(onnx_files[target], target, profile, report)
        return {"engine": engine, "target": target, "sm": sm, "backend": module, "profile": profile,
                "plugin_libs": plugin_libs}

    def estimate(self, onnx_path: Path, target: str, profile: dict, report: dict) -> None:
        """reports/roofline.json and its lines: an estimate, never a measurement (exporter.roofline)."""
        import onnx

        from .roofline import roofline, summary_lines

        shapes = {name: list(opt) for name, (_, opt, _) in profile.items()}
        est = roofline(onnx.load(str(onnx_path), load_external_data=False), shapes, target, report)
        atomic_write_json(self.out / "reports" / "roofline.json", est)
        for line in summary_lines(est):
            self.say(f"[estimate] {line}")

    # -- manifest ------------------------------------------------------------------------------
    def write_manifest(self, checkpoint: Path, onnx_export: Path, onnx_files: dict,
                       engine: dict | None, extra: dict | None = None) -> dict:
        from .checkpoint import read_checkpoint_config

        cfg, _ = read_checkpoint_config(checkpoint)
        profile = profiles_for(self.preset, self.opts)
        artifacts = {"checkpoint": _rel(self.out, checkpoint) if checkpoint.resolve().is_relative_to(
            self.out.resolve()) else str(checkpoint.resolve()), "export_onnx": _rel(self.out, onnx_export)}
        for t, p in onnx_files.items():
            artifacts[f"{t}_onnx"] = _rel(self.out, p)
        if engine:
            artifacts["engine"] = _rel(self.out, engine["engine"])
        reports = sorted(str(p.relative_to(self.out)) for p in (self.out / "reports").glob("*.json"))
        artifacts["reports"] = reports
        hashes = {}
        for rel in [v for k, v in artifacts.items() if isinstance(v, str) and not Path(v).is_absolute()]:
            p = self.out / rel
            for f in [p, p.with_name(p.name + ".data")]:
                if f.is_file():
                    hashes[str(f.relative_to(self.out))] = sha256_file(f)
        inputs = []
        for name, (lo, opt, hi) in profile.items():
            inputs.append({"name": name, "dtype": "float16" if self.opts.fp16 else "float32",
                           "min_shape": list(lo), "opt_shape": list(opt), "max_shape": list(hi),
                           "example_shape": list(opt)})
        inputs.insert(1, {"name": "timestep", "dtype": "float32", "min_shape": [], "opt_shape": [],
                          "max_shape": [], "example_shape": []})
        manifest = {
            "model": self.opts.model,
            "scheme": self.opts.scheme,
            "quantization": _quant_summary(cfg),
            "artifacts": artifacts,
            "inputs": inputs,
            "outputs": [{"name": "out_sample", "dtype": "float16" if self.opts.fp16 else "float32"}],
            "engine": None if engine is None else {
                "target": engine["target"], "sm": engine["sm"], "backend": engine["backend"]},
            "plugin_library": _plugin_library(),
            "talora_table": (cfg.get("talora") or {}).get("table_runs"),
            "loras": [{"file": s} for s in self.opts.loras],
            "tool_versions": _versions(),
            "hashes": hashes,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
        }
        manifest.update(extra or {})
        atomic_write_json(self.out / MANIFEST, manifest)
        return manifest


def default_rtx_target(sm: int) -> str:
    """TensorRT-RTX's default target: native on Blackwell (FP4), else fp8 (Ada's FP8 tensor cores;
    Turing / Ampere build it too, dequantized by TensorRT)."""
    return "native" if sm >= NATIVE_MIN_SM else "fp8"


def check_rtx_target(target: str, sm: int) -> None:
    """Refuse, before any work, what TensorRT-RTX cannot build."""
    if target == "plugin":
        raise UserError("TensorRT-RTX builds networks without plugin layers: use --target fp8, "
                        "reference or native here, or build the plugin target on a GPU host with "
                        "TensorRT (`export-engine build OUT`)", EXIT_INPUT)
    if target == "native" and sm < NATIVE_MIN_SM:
        raise UserError(f"--target native holds FP4 types, which TensorRT-RTX builds only for "
                        f"Blackwell (--sm 120); use --target fp8 for SM{sm}", EXIT_INPUT)


def build_engine_with_report(onnx_path, engine, reports_dir, passes_report, **kwargs):
    """build_engine, then reports/engine_layers.{json,md} from the builder's layer lines (one
    function, so an isolated build returns no layer lines through the process boundary)."""
    from .engine import build_engine
    from .engine_report import read_rows, write_report

    res = build_engine(onnx_path, engine, **kwargs)
    write_report(reports_dir, res.layer_lines, read_rows(passes_report) if passes_report else None)
    res.layer_lines = []
    return res


def _quant_summary(cfg: dict) -> dict:
    """Counts of weight / activation formats and features over the checkpoint's layers."""
    w, a, mixed, aal = {}, {}, 0, 0
    for layer in cfg.get("layers", {}).values():
        wf, af = layer["weight"]["format"], layer["activation"]["format"] or "float"
        w[wf] = w.get(wf, 0) + 1
        a[af] = a.get(af, 0) + 1
        mixed += len(layer["weight"]["bits_histogram"]) > 1
        aal += bool(layer.get("aal"))
    return {"preset": cfg.get("preset"), "scheme": cfg.get("scheme"), "layers": len(cfg.get("layers", {})),
            "weight_formats": w, "activation_formats": a, "mixed_precision_layers": mixed,
            "aal_layers": aal, "kept_high_precision": cfg.get("kept_fp", []),
            "talora_adapters": (cfg.get("talora") or {}).get("adapters")}


def _plugin_library() -> str | None:
    try:
        from plugins.loader import plugin_library_path

        return str(plugin_library_path(build_if_missing=False))
    except Exception:  # not built here: the README says how to build it on a GPU host
        return None


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch

    from . import __version__

    v = {"export_engine": __version__, "python": platform.python_version(), "torch": torch.__version__,
         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    for mod in ("diffusers", "tensorrt", "tensorrt_rtx"):
        if has_module(mod):
            try:
                v[mod] = __import__(mod).__version__
            except Exception:
                v[mod] = "unknown"
    return v


def run(opts: RunOptions) -> dict:
    """The main command; returns the manifest."""
    if opts.target is not None and opts.target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {opts.target!r}")
    _check_sm(opts)
    t0 = time.perf_counter()
    _path_fingerprint(opts.model_path)  # a missing --model-path fails before anything is written
    preset = model_preset(opts.model, opts.model_path, opts.quantized)
    check_loras_fit(_read_loras(opts.loras, preset), preset)
    _embeddings_fingerprint(opts.calib_embeddings, preset)
    _check_batch(opts)
    p = Pipeline(opts)
    if p.opts.model_path is None and not opts.quantized:
        p.say(f"warning: no --model-path: {opts.model} is built with seeded random weights; this "
              "exercises the pipeline but the model generates noise")
    _warn_if_disk_is_short(p)
    qkey, ckpt = p.quantize()
    ekey, onnx_path = p.export(qkey, ckpt)
    pkey, onnx_files = p.passes(ekey, onnx_path)
    engine = p.build(pkey, onnx_files) if opts.build else None
    if not opts.build:
        p.say(f"[build] skipped (--no-build); build later with `export-engine build {p.out}`")
    manifest = p.write_manifest(ckpt, onnx_path, onnx_files, engine)
    verify = opts.verify
    if verify is None:
        verify = p.params < VERIFY_AUTO_MAX_PARAMS
    if verify:
        from .verify import verify_export

        report = verify_export(p.out, quiet=opts.quiet, model=p.model)
        manifest = json.loads((p.out / MANIFEST).read_text())
        if not report["passed"]:
            raise UserError(f"verify: {report['failed'][0]} (see {p.out / 'verify' / 'verify.md'})",
                            EXIT_TOLERANCE)
    else:
        p.say(f"[verify] skipped for a model this size on CPU; run `export-engine verify {p.out}`")
    p.say(f"done in {time.perf_counter() - t0:.0f} s: {p.out / MANIFEST}")
    return manifest


def _check_batch(opts: RunOptions) -> None:
    """A --batch whose UNet batch the export cannot take fails before any stage runs."""
    from .export import MAX_UNET_BATCH

    unet_max = opts.batch[2] * (2 if opts.cfg else 1)
    if unet_max > MAX_UNET_BATCH:
        raise UserError(f"--batch max {opts.batch[2]} gives a UNet batch of {unet_max}"
                        f"{' (classifier-free guidance doubles it)' if opts.cfg else ''}; the export "
                        f"supports at most {MAX_UNET_BATCH}: lower the MAX of --batch MIN:OPT:MAX",
                        EXIT_INPUT)


def _check_sm(opts: RunOptions) -> None:
    """A bad --sm or --target / --sm pair fails before any stage runs (not after the passes)."""
    if not opts.build or (has_module("tensorrt") and cuda_available()) or not has_module("tensorrt_rtx"):
        return
    sm = opts.sm or 89
    try:
        from .engine import compute_capability, load_tensorrt

        compute_capability(load_tensorrt("tensorrt_rtx"), sm)
    except ValueError as err:
        raise UserError(f"--sm {sm}: {err}", EXIT_INPUT) from None
    check_rtx_target(opts.target or default_rtx_target(sm), sm)


def _warn_if_disk_is_short(p: Pipeline) -> None:
    """Say so up front when the out dir's disk lacks room for what the job will write (an
    estimate, so a warning): a full disk otherwise surfaces minutes later as an OSError."""
    import shutil

    have = sum(f.stat().st_size for f in p.out.rglob("*") if f.is_file())
    need = p.params * DISK_BYTES_PER_PARAM - have
    free = shutil.disk_usage(p.out).free
    if free < need:
        p.say(f"warning: {p.out} has {free / 1e9:.1f} GB free; this job writes about "
              f"{need / 1e9:.0f} GB more (checkpoint, ONNX export, targets, engine)")


def _param_count(preset) -> int:
    """Parameters of the preset's float model (built on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        return sum(t.numel() for t in preset.build_empty().parameters())


def build_existing(out: str | Path, target: str | None = None, sm: int | None = None,
                   force: bool = False, quiet: bool = False) -> dict:
    """`export-engine build OUT`: an engine from an existing export (TensorRT must be there)."""
    out = Path(out)
    manifest = read_manifest(out)
    ckpt = out / manifest["artifacts"]["checkpoint"]
    # the checkpoint names the model's own architecture (for the engine profiles); an export
    # copied without it still builds, with the named preset's profiles
    opts = RunOptions(model=manifest["model"], scheme=manifest.get("scheme", "w4a4"), out=str(out),
                      target=target, sm=sm, force=force, quiet=quiet,
                      quantized=str(ckpt) if ckpt.is_file() else None)
    p = Pipeline(opts)
    files = {t: out / manifest["artifacts"][f"{t}_onnx"] for t in TARGETS
             if manifest["artifacts"].get(f"{t}_onnx")}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise UserError(f"{out}: the export is incomplete ({', '.join(missing)} missing); rerun "
                        f"`export-engine {manifest['model']} --{opts.scheme} --out {out}`", EXIT_INPUT)
    want = target
    if want is None and not (has_module("tensorrt") and cuda_available()) and has_module("tensorrt_rtx"):
        want = default_rtx_target(sm or 89)
    if want is not None and want not in files:  # an export from before this target: make it now
        if has_module("tensorrt_rtx") and not (has_module("tensorrt") and cuda_available()):
            check_rtx_target(want, sm or 89)
        files[want] = _make_target(p, out / manifest["artifacts"]["export_onnx"], want)
    upstream = stage_key("existing", {t: file_fingerprint(f) for t, f in files.items()})
    engine = p.build(upstream, files, explicit=True)
    return p.write_manifest(ckpt, out / manifest["artifacts"]["export_onnx"], files, engine,
                            {k: v for k, v in manifest.items() if k in ("verify",)})


def _make_target(p: Pipeline, export_onnx: Path, target: str) -> Path:
    from graph_passes.targets import build_target

    dest = p.out / f"{target}.onnx"
    p.say(f"[passes] {target} target (not in this export yet)")
    info = p._call(build_target, export_onnx, target, dest, quiet=p.opts.quiet)
    atomic_write_json(p.out / "reports" / f"passes_{target}.json", info)
    return dest


def read_manifest(out: str | Path) -> dict:
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        raise UserError(f"{out} is not an export-engine export (no {MANIFEST}); make one with "
                        "`export-engine MODEL --w4a4 --out DIR`", EXIT_INPUT)
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is corrupt ({err}); rerun the export", EXIT_INPUT) from None
