"""A user's diffusers folder: find its UNet, read and check its config.json, read its scheduler.

diffusers' convention: ``config.json`` defines the model and the weights come after it. A
pipeline folder has ``unet/`` (and ``scheduler/``) inside; a bare UNet folder has the config
itself. The pipeline supports the UNet2DConditionModel layouts of SD 1.x/2.x and SDXL (with or
without ``text_time`` added conditioning); anything else is refused here with the key that makes
it different, before a model is built.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cli import UserError

UNET_CLASS = "UNet2DConditionModel"
#: blocks the export, the graph passes and verify are tested on (SD 1.x/2.x, SDXL layouts)
SUPPORTED_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
}
#: conditioning the exported inputs (sample, timestep, encoder_hidden_states[, text_embeds,
#: time_ids]) cannot feed: each key must have one of these values
SUPPORTED_CONDITIONING = {
    "addition_embed_type": (None, "text_time"),
    "class_embed_type": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--model-path {path}: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"--model-path {path}: expected a JSON object")
    return data


def unet_folder(root: str | Path) -> Path:
    """The folder holding the UNet's config.json: ``root/unet`` or ``root`` itself.

    A config.json of another model class (a UNet2DModel, a transformer, a VAE) is an error that
    names the class; a folder with neither is an error that says what was expected."""
    root = Path(root)
    found = []
    for folder in (root / "unet", root):
        cfg_file = folder / "config.json"
        if cfg_file.is_file():
            cls = _read_json(cfg_file).get("_class_name")
            if cls == UNET_CLASS:
                return folder
            found.append((cfg_file, cls))
    if found:
        cfg_file, cls = found[0]
        raise UserError(f"--model-path {cfg_file}: describes a {cls or 'model without _class_name'}, not a "
                        f"{UNET_CLASS}; give a diffusers UNet folder (or the pipeline folder with unet/)")
    raise UserError(f"--model-path {root}: no UNet found (expected unet/config.json with "
                    f"_class_name {UNET_CLASS}, or a single-file .safetensors)")


def check_supported(config: dict, where: str | Path) -> None:
    """One-line UserError naming the first block type or conditioning key the pipeline lacks.
    Keys the config leaves out take diffusers' defaults, which are all supported."""
    for key, allowed in SUPPORTED_BLOCKS.items():
        values = config.get(key, allowed[0])
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value not in allowed:
                raise UserError(f"--model-path {where}: {key} has {value!r}, an unsupported block type "
                                f"(supported: {', '.join(allowed)})")
    for key, allowed in SUPPORTED_CONDITIONING.items():
        if config.get(key) not in allowed:
            raise UserError(f"--model-path {where}: {key}={config[key]!r} is not supported (the export feeds "
                            "sample, timestep, encoder_hidden_states and, for text_time, text_embeds and time_ids)")
    if not isinstance(config.get("cross_attention_dim", 1280), int):
        raise UserError(f"--model-path {where}: cross_attention_dim must be one integer, got "
                        f"{config['cross_attention_dim']!r}")


def read_unet_config(root: str | Path) -> tuple[dict, Path]:
    """(the UNet's config.json as saved by ``save_pretrained``, the folder it is in), checked as
    supported; the model is built from it with ``UNet2DConditionModel.from_config``."""
    folder = unet_folder(root)
    config = _read_json(folder / "config.json")
    check_supported(config, folder / "config.json")
    return config, folder


def read_scheduler_config(root: str | Path) -> dict | None:
    """The pipeline's ``scheduler/scheduler_config.json`` (beside ``unet/``) when present, else None."""
    root = Path(root)
    folder = unet_folder(root)
    for cand in (root / "scheduler", folder.parent / "scheduler"):
        f = cand / "scheduler_config.json"
        if f.is_file():
            return {k: v for k, v in _read_json(f).items() if not k.startswith("_")}
    return None
