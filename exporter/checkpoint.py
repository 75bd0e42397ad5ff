"""Quantized UNet checkpoints: one safetensors file (every tensor) plus one JSON file (what they mean).

``DIR/quantized.safetensors`` holds the model's whole state dict: base weights
(fp16 where that is lossless, else fp32), per-channel weight scales and bit
widths, activation scales and zero points, smoothing factors, LoRA / TALoRA
adapters, the TALoRA router and its frozen table. ``DIR/quantized.json``
says how to rebuild the model around them: preset and base config (with its
hash; ``config_source`` names the user's folder when that config came from one, and then the
base config defines the model), scheduler, scheme, and per layer the weight format, activation format and mode,
the AAL flag, smoothing and LoRA configuration. docs/quantization.md
documents the format for users who quantize elsewhere.

Loading rebuilds the preset on the meta device, swaps in the quantized layers
the JSON lists and assigns the stored tensors: outputs are bit-identical to
the model that was saved. Both files are written atomically (temporary name,
then rename; the JSON, written last, records the tensor file's sha256).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path, atomic_write_json, check_writable_dir, sha256_file
from .cli import EXIT_OUTPUT, UserError
from .formats import with_bits
from .layers import QUANT_LAYERS, QuantConv2d, QuantLinear, quant_layers, swap_quant_layers
from .lora import LoRA, TALoRA
from .safetensors_io import iter_tensors, tensor_names, write_file

FORMAT_NAME = "export-engine.quantized-unet"
FORMAT_VERSION = 1
JSON_NAME = "quantized.json"
TENSORS_NAME = "quantized.safetensors"


def _storage_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 tensors that fp16 holds exactly are stored as fp16 (half the bytes, same values)."""
    if t.dtype == torch.float32 and torch.equal(t.detach().half().float(), t.detach()):
        return torch.float16
    return t.dtype


def _layer_entry(name: str, layer) -> dict:
    wq, aq = layer.w_quant, layer.a_quant
    bits = torch.bincount(wq.bits.long().cpu(), minlength=9)
    entry = {
        "type": "Conv2d" if isinstance(layer, QuantConv2d) else "Linear",
        "weight": {
            "format": wq.fmt.name,
            "scale": f"{name}.w_quant.scale",
            "bits": f"{name}.w_quant.bits",
            "bits_histogram": {str(b): int(bits[b]) for b in range(9) if bits[b]},
            "channel_formats": {str(b): with_bits(wq.fmt, b).name for b in range(9) if bits[b]},
        },
        "activation": {
            "format": aq.fmt.name if aq.enabled else None,
            "mode": aq.mode if aq.enabled else None,
            "scale": float(aq.scale),
            "zero_point": float(aq.zero_point),
            "channel_axis": aq.channel_axis,
        },
        "aal": bool(getattr(layer, "aal", False)),
        "smoothing": None if layer.smooth is None else {
            "tensor": f"{name}.smooth",
            "apply": "x / smooth before the activation quantizer; weight * smooth (input channels) "
                     "before the weight quantizer",
        },
        "lora": None,
    }
    if isinstance(layer, QuantLinear):
        entry.update(in_features=layer.in_features, out_features=layer.out_features)
    else:
        entry.update(in_channels=layer.in_channels, out_channels=layer.out_channels,
                     kernel_size=list(layer.kernel_size), stride=list(layer.stride),
                     padding=list(layer.padding), dilation=list(layer.dilation), groups=layer.groups)
    if layer.lora is not None:
        talora = isinstance(layer.lora, TALoRA)
        entry["lora"] = {"kind": "talora" if talora else "lora", "rank": int(layer.lora.A.shape[-2]),
                         "adapters": int(layer.lora.A.shape[0]) if talora else 1,
                         "scale": layer.lora.scale, "A": f"{name}.lora.A", "B": f"{name}.lora.B"}
    return entry


def checkpoint_config(model: nn.Module, report=None) -> dict:
    """The JSON half of a checkpoint, from the model's own state (and the optional report)."""
    from .finetune import table_runs
    from .models.presets import get_preset

    info = getattr(model, "quantization", None)
    if info is None:
        raise ValueError("model has no quantization info: quantize it with exporter.quantize.quantize_model "
                         "or load it with load_checkpoint")
    # older in-memory models carry no base_config: the named preset's bundled one
    model_fields = {k: info[k] for k in ("base_config", "config_source", "scheduler") if k in info} \
        or get_preset(info["preset"]).checkpoint_fields()
    layers = {name: _layer_entry(name, layer) for name, layer in quant_layers(model)}
    cfg = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "preset": info["preset"], "scheme": info["scheme"],
        **model_fields, "base_config_hash": info["base_config_hash"],
        "random_weights": bool(info.get("random_weights", False)),
        "tensors": {"file": TENSORS_NAME},
        "layers": layers,
        "talora": None,
    }
    ctrl = getattr(model, "talora", None)
    if ctrl is not None:
        some = next(l.lora for _, l in quant_layers(model) if isinstance(l.lora, TALoRA))
        cfg["talora"] = {
            "adapters": ctrl.num_adapters, "rank": int(some.A.shape[-2]), "scale": some.scale,
            "router": {"embed_dim": ctrl.router.net[0].in_features, "hidden": ctrl.router.net[0].out_features,
                       "input": "unet.time_embedding output (timestep embedding)"},
            "num_train_timesteps": int(ctrl.table.numel()), "frozen": ctrl.frozen,
            "table": "talora.table",
            "lookup": "adapter = table[clamp(round_half_even(t), 0, num_train_timesteps - 1)]; "
                      "one timestep per batch",
            "table_runs": table_runs(ctrl.table.cpu()),
        }
    if report is not None:
        r = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        cfg["report"] = {k: r.get(k) for k in ("config", "calibration", "metrics", "finetune", "seconds")}
        cfg["kept_fp"] = r.get("kept_fp", [])
    return cfg


def save_checkpoint(model: nn.Module, out_dir: str | Path, report=None) -> Path:
    """Write ``out_dir/quantized.safetensors`` and ``out_dir/quantized.json``; returns the JSON path."""
    try:
        out = check_writable_dir(out_dir)
    except PermissionError as err:
        raise UserError(str(err), EXIT_OUTPUT) from None
    cfg = checkpoint_config(model, report)
    with atomic_path(out / TENSORS_NAME) as tmp:
        write_file(tmp, model.state_dict(), {"format": "pt", "export_engine": FORMAT_NAME}, _storage_dtype)
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    cfg["tensors"].update(sha256=digest, bytes=size)
    atomic_write_json(out / JSON_NAME, cfg)
    return out / JSON_NAME


def read_checkpoint_config(path: str | Path) -> tuple[dict, Path]:
    """(JSON config, folder) of a checkpoint given its folder or JSON file."""
    path = Path(path)
    json_path = path / JSON_NAME if path.is_dir() else path
    if not json_path.is_file():
        raise UserError(f"{path}: no quantized checkpoint here (expected {JSON_NAME})")
    try:
        cfg = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{json_path}: unreadable checkpoint config ({err})") from None
    if cfg.get("format") != FORMAT_NAME:
        raise UserError(f"{json_path}: not an export-engine quantized checkpoint")
    if cfg.get("version") != FORMAT_VERSION:
        raise UserError(f"{json_path}: checkpoint version {cfg.get('version')} is not supported "
                        f"(this export-engine reads version {FORMAT_VERSION})")
    return cfg, json_path.parent


def load_checkpoint(path: str | Path, preset=None, device: str = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild the quantized UNet saved by :func:`save_checkpoint` (bit-identical outputs).

    preset: a name or Preset the checkpoint must match (default: the one it
    names); a different base config is a :class:`UserError`. ``verify``
    checks the tensor file's sha256 against the JSON.
    """
    from .finetune import TALoRAController
    from .models.presets import get_preset

    cfg, folder = read_checkpoint_config(path)
    missing = [k for k in ("preset", "scheme", "base_config_hash", "tensors", "layers") if k not in cfg]
    if missing:
        raise UserError(f"checkpoint {folder}: {JSON_NAME} lacks {', '.join(repr(k) for k in missing)}")
    preset = get_preset(preset or cfg["preset"]) if not hasattr(preset, "config") else preset
    preset = preset.for_checkpoint(cfg)  # a model from a user's folder: its config, not the preset's
    _check_base_config(cfg, preset, folder)
    tensor_file = folder / cfg["tensors"]["file"]
    if not tensor_file.is_file():
        raise UserError(f"checkpoint {folder}: tensor file {tensor_file.name} is missing")
    if verify and cfg["tensors"].get("sha256") and sha256_file(tensor_file) != cfg["tensors"]["sha256"]:
        raise UserError(f"checkpoint {folder}: {tensor_file.name} does not match its sha256 in {JSON_NAME} "
                        f"(corrupt or from another save)")

    model = preset.build_empty()
    layers = cfg["layers"]
    missing = [n for n in layers if not _has_module(model, n)]
    if missing:
        raise UserError(f"checkpoint {folder}: layer {missing[0]} does not exist in {preset.name}")

    def make(name, layer):
        entry = layers[name]
        try:
            q = QUANT_LAYERS[type(layer)](layer, w_fmt=entry["weight"]["format"],
                                          a_fmt=entry["activation"]["format"] or "e2m1",
                                          a_mode=entry["activation"]["mode"] or "static")
            q.a_quant.enabled = entry["activation"]["format"] is not None
            if entry["smoothing"] is not None:
                q.smooth = torch.empty(layer.weight.shape[1], device="meta")
            q.aal = bool(entry["aal"])
            entry["lora"]  # noqa: B018 (checked here so that a missing key names its layer)
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"checkpoint {folder}: layer {name} has a bad or incomplete entry in {JSON_NAME} "
                            f"({type(err).__name__}: {err})") from None
        return q

    swap_quant_layers(model, include=lambda n: n in layers, factory=make)
    talora = cfg.get("talora")
    ctrl = None
    if talora is not None:
        try:
            ok = isinstance(talora["adapters"], int) and talora["adapters"] >= 1 \
                and isinstance(talora["router"]["embed_dim"], int) and isinstance(talora["router"]["hidden"], int) \
                and isinstance(talora["num_train_timesteps"], int)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise UserError(f"checkpoint {folder}: bad talora section in {JSON_NAME} (needs adapters K >= 1, "
                            f"router.embed_dim, router.hidden, num_train_timesteps): {json.dumps(talora)[:120]}")
        ctrl = TALoRAController(talora["adapters"], talora["router"]["embed_dim"], talora["num_train_timesteps"],
                                talora["router"]["hidden"]).to("meta")
        model.talora = ctrl
    for name, layer in quant_layers(model):
        lcfg = layers[name]["lora"]
        if lcfg is None:
            continue
        if not isinstance(lcfg, dict) or lcfg.get("kind") not in ("talora", "lora") \
                or not isinstance(lcfg.get("rank"), int) or lcfg["rank"] < 1 or "scale" not in lcfg:
            raise UserError(f"checkpoint {folder}: layer {name} has a bad lora entry in {JSON_NAME} (needs kind "
                            f"'talora' or 'lora', a positive integer rank and a scale): {json.dumps(lcfg)[:120]}")
        if lcfg["kind"] == "talora":
            if ctrl is None:
                raise UserError(f"checkpoint {folder}: {name} has TALoRA adapters but no talora section")
            lora = TALoRA(layer.fan_in, layer.weight.shape[0], lcfg["rank"], ctrl.selection, lcfg["scale"])
        else:
            lora = LoRA(layer.fan_in, layer.weight.shape[0], lcfg["rank"], lcfg["scale"])
        layer.add_lora(lora.to("meta"))

    expected = model.state_dict()
    stored = {}
    try:
        keys = set(tensor_names(tensor_file))
        if keys != set(expected):
            odd = sorted(keys - set(expected))[:1] + sorted(set(expected) - keys)[:1]
            raise UserError(f"checkpoint {folder}: tensors do not match the model its JSON describes "
                            f"(e.g. {odd[0]})")
        for k, v in iter_tensors(tensor_file, list(expected)):  # one at a time: no second model copy
            if v.shape != expected[k].shape:
                raise UserError(f"checkpoint {folder}: {k} has shape {tuple(v.shape)}, "
                                f"{preset.name} expects {tuple(expected[k].shape)}")
            stored[k] = v.to(expected[k].dtype)
    except (OSError, ValueError, KeyError) as err:  # a damaged file
        raise UserError(f"checkpoint {folder}: unreadable tensor file ({err})") from None
    model.load_state_dict(stored, strict=True, assign=True)
    model.quantization = {"preset": cfg["preset"], "scheme": cfg["scheme"],
                          "base_config_hash": cfg["base_config_hash"],
                          "random_weights": cfg.get("random_weights", False), **preset.checkpoint_fields()}
    model = model.eval().requires_grad_(False).to(device)
    if ctrl is not None:
        ctrl.attach(model)
    return model


def _check_base_config(cfg: dict, preset, folder: Path) -> None:
    """The checkpoint's base UNet config must be the preset's: one-line errors that name the key."""
    from .models.presets import config_hash

    base = cfg.get("base_config")
    if isinstance(base, dict) and config_hash(base) != cfg["base_config_hash"]:
        raise UserError(f"checkpoint {folder}: base_config does not match base_config_hash in {JSON_NAME} "
                        f"(edited or from another model)")
    if preset.config_hash() == cfg["base_config_hash"]:
        return
    what = f"checkpoint {folder} was made for a UNet ({cfg['preset']}) whose config and {preset.name}'s do not match"
    if isinstance(base, dict):
        ours = preset.config()
        diff = [k for k in sorted(set(base) | set(ours)) if not k.startswith("_") and base.get(k) != ours.get(k)]
        k = diff[0]
        raise UserError(f"{what}: {k} is {base.get(k)!r}, {preset.name} has {ours.get(k)!r} "
                        f"({len(diff)} key(s) differ)")
    raise UserError(f"{what}: base_config_hash {cfg['base_config_hash'][:19]}..., {preset.name} has "
                    f"{preset.config_hash()[:19]}...")


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        return type(model.get_submodule(name)) in QUANT_LAYERS
    except AttributeError:
        return False
