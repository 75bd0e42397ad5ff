"""Read user LoRA files (diffusers/PEFT and kohya SDXL safetensors) into per-layer deltas.

Every key format ends up as ``{module_name: LoraDelta}`` where ``module_name`` is the diffusers
UNet module path (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``) and the delta is
``scale * B @ A`` with A [rank, fan_in], B [out, rank] (conv LoRAs flattened to that shape).
Kohya keys in diffusers naming (``lora_unet_down_blocks_0_..._to_q``) are mapped from the model's
own module names when its config is given, so they fit any UNet2DConditionModel; kohya keys in the
original SGM naming (``lora_unet_input_blocks_*``, SDXL) and files read without a config go
through diffusers' own converters.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: PEFT / diffusers / converted-kohya spellings of the two LoRA factors
_DOWN = (".lora_A.weight", ".lora.down.weight", ".lora_down.weight", "_lora.down.weight",
         ".lora_linear_layer.down.weight")
_UP = {d: d.replace("lora_A", "lora_B").replace("down", "up") for d in _DOWN}
_PREFIXES = ("unet.", "base_model.model.", "model.")
#: old attention-processor spellings -> module names
_PROCESSOR_NAMES = {".processor.to_q": ".to_q", ".processor.to_k": ".to_k", ".processor.to_v": ".to_v",
                    ".processor.to_out": ".to_out.0"}


class LoraFileError(ValueError):
    """A LoRA file that cannot be read or applied; the message names the file and the key."""


@dataclass
class LoraDelta:
    """delta W = scale * B @ A for one layer; A [rank, fan_in], B [out, rank], float32."""

    module: str
    A: np.ndarray
    B: np.ndarray
    scale: float
    key: str  # the file's key for A, for error messages

    def delta(self) -> np.ndarray:
        return (self.scale * (self.B.astype(np.float64) @ self.A.astype(np.float64))).astype(np.float32)


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """``FILE[:SCALE]`` -> (path, scale); a trailing ``:number`` is the scale."""
    m = re.match(r"^(.*?)(?::([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?))?$", arg)
    path, scale = m.group(1), m.group(2)
    if not path:
        raise LoraFileError(f"--lora {arg!r}: expected FILE[:SCALE], e.g. style.safetensors:0.8")
    return Path(path), float(scale) if scale is not None else 1.0


def _load_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors as float32 numpy, header metadata) of a .safetensors file; no pickle involved."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k).float().numpy() for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LoraFileError(f"LoRA file {path} is not a readable .safetensors file ({err})") from None
    return tensors, metadata


def _peft_scale(metadata: dict, module: str, rank: int) -> float | None:
    """lora_alpha / r from diffusers' ``lora_adapter_metadata`` header (PEFT config), if present."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    cfg = {k.removeprefix("unet."): v for k, v in json.loads(raw).items()}

    def pattern_value(patterns: dict, default):
        for key, value in (patterns or {}).items():
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        return default

    alpha = pattern_value(cfg.get("alpha_pattern"), cfg.get("lora_alpha"))
    if alpha is None:
        return None
    r = pattern_value(cfg.get("rank_pattern"), cfg.get("r", rank))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _module_name(key_base: str) -> str:
    for p in _PREFIXES:
        if key_base.startswith(p):
            key_base = key_base[len(p):]
    for old, new in _PROCESSOR_NAMES.items():
        if key_base.endswith(old):
            key_base = key_base[: -len(old)] + new
    return key_base


#: original SGM block names: such kohya files need diffusers' block renaming
_SGM_BLOCKS = ("_input_blocks_", "_middle_block_", "_output_blocks_")


@functools.lru_cache(maxsize=4)
def _kohya_module_names(config_json: str) -> dict[str, str]:
    """kohya name (``lora_unet_`` + the module path with ``_`` for ``.``) -> module path, for every
    Linear/Conv2d of the UNet the config describes (built on the meta device: no memory)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_json))
    names: dict[str, str] = {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            names["lora_unet_" + name.replace(".", "_")] = name
    return names


def _from_kohya_by_module_names(tensors: dict, unet_config: dict, path: Path) -> dict:
    """Rename kohya ``lora_unet_<module>.<factor>`` keys to ``<module path>.<factor>``."""
    names = _kohya_module_names(json.dumps(unet_config, sort_keys=True))
    out = {}
    for key, value in tensors.items():
        if key.startswith("lora_te"):  # text encoder LoRAs: not part of the UNet
            continue
        base, _, factor = key.partition(".")
        if base not in names:
            raise LoraFileError(f"LoRA file {path}: kohya key {key!r} names no Linear/Conv2d layer of this UNet")
        out[names[base] + "." + factor] = value
    return out


def _from_kohya(tensors: dict, unet_config: dict | None) -> tuple[dict, dict]:
    """Rename kohya ``lora_unet_*`` keys with diffusers' converters; returns (tensors, alphas)."""
    import torch
    from diffusers.loaders import lora_conversion_utils as conv

    sd = {k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith("lora_te")}
    if unet_config is not None and any("input_blocks" in k for k in sd):
        sd = conv._maybe_map_sgm_blocks_to_diffusers(sd, unet_config)
    sd, alphas = conv._convert_non_diffusers_lora_to_diffusers(sd)
    return {k: v.numpy() for k, v in sd.items()}, alphas


def read_lora_file(path: str | Path, user_scale: float = 1.0,
                   unet_config: dict | None = None) -> dict[str, LoraDelta]:
    """Read one LoRA file into ``{module_name: LoraDelta}``.

    ``scale = user_scale * alpha / rank`` with alpha from the file: kohya ``.alpha`` keys, or the
    PEFT config diffusers' ``save_lora_weights`` stores in the header (``lora_adapter_metadata``:
    lora_alpha, r, alpha/rank patterns, rsLoRA); a file with neither means alpha == rank.
    ``unet_config`` lets kohya SDXL files that use the original SGM block names be mapped.
    """
    path = Path(path)
    tensors, metadata = _load_safetensors(path)
    if not tensors:
        raise LoraFileError(f"LoRA file {path} holds no tensors")
    alphas: dict[str, float] = {}
    if any(k.startswith("lora_unet_") for k in tensors):
        if unet_config is not None and not any(b in k for k in tensors for b in _SGM_BLOCKS):
            tensors = _from_kohya_by_module_names(tensors, unet_config, path)
        else:
            try:
                tensors, alphas = _from_kohya(tensors, unet_config)
            except ValueError as err:
                raise LoraFileError(f"LoRA file {path}: kohya keys could not be converted ({err})") from None
    for key, value in tensors.items():
        if key.endswith(".alpha") and value.size == 1:
            alphas[key] = float(value)
    out: dict[str, LoraDelta] = {}
    for key, down in tensors.items():
        suffix = next((s for s in _DOWN if key.endswith(s)), None)
        if suffix is None:
            continue
        base = key[: -len(suffix)]
        up_key = base + _UP[suffix]
        if up_key not in tensors:
            raise LoraFileError(f"LoRA file {path}: key {key!r} has no matching up/B weight {up_key!r}")
        up = tensors[up_key]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise LoraFileError(
                f"LoRA file {path}: key {key!r} has rank {rank} but {up_key!r} has shape {up.shape}")
        module = _module_name(base)
        alpha = next((alphas[k] for k in (base + ".alpha", "unet." + base + ".alpha",
                                          module + ".alpha") if k in alphas), None)
        file_scale = alpha / rank if alpha is not None else _peft_scale(metadata, module, rank)
        scale = user_scale * (file_scale if file_scale is not None else 1.0)
        out[module] = LoraDelta(module, down.reshape(rank, -1), up.reshape(up.shape[0], rank),
                                scale, key)
    if not out:
        sample = ", ".join(list(tensors)[:3])
        raise LoraFileError(
            f"LoRA file {path}: no LoRA weights found (keys like {sample!r}); expected diffusers/PEFT "
            "keys ending in lora_A.weight/lora_B.weight or kohya lora_unet_* keys")
    return out


def check_against_layers(deltas: dict[str, LoraDelta], layer_shapes: dict[str, tuple[int, int]],
                         path: str | Path = "") -> None:
    """Every delta must name a known layer with matching (out, fan_in); errors name the key."""
    for name, d in deltas.items():
        if name not in layer_shapes:
            close = [n for n in layer_shapes if n.split(".")[-1] == name.split(".")[-1]][:2]
            hint = f" (layers with the same leaf name: {', '.join(close)})" if close else ""
            raise LoraFileError(f"LoRA file {path}: key {d.key!r} matches no layer of the model "
                                f"(looked for {name!r}){hint}")
        out_ch, fan_in = layer_shapes[name]
        if (d.B.shape[0], d.A.shape[1]) != (out_ch, fan_in):
            raise LoraFileError(
                f"LoRA file {path}: key {d.key!r} gives a {d.B.shape[0]}x{d.A.shape[1]} delta but layer "
                f"{name!r} is {out_ch}x{fan_in}")
