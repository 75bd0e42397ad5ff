"""Load UNet weights from a diffusers folder or a single-file .safetensors checkpoint.

Tensors are read one at a time (plain reads, no memory map) and copied into
the (already allocated) model, so the peak is the model plus one tensor, not
the model plus the whole file.

Single-file checkpoints with the original SGM key names
(``model.diffusion_model.*``, as released by Stability AI and most fine-tune
sites) are renamed with diffusers' own converter
(:func:`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`) and
the bundled config: no hub access. The converter only renames keys, so we run
it on the key names alone and load tensors lazily.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from ..cli import UserError
from ..safetensors_io import iter_tensors, tensor_names

SGM_PREFIX = "model.diffusion_model."
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bf16.safetensors",
)
INDEX_NAMES = tuple(n + ".index.json" for n in WEIGHT_NAMES)
#: config keys that decide the architecture (a folder whose unet config differs here is refused)
_ARCH_KEYS = (
    "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "mid_block_type", "layers_per_block", "transformer_layers_per_block", "cross_attention_dim",
    "attention_head_dim", "num_attention_heads", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "use_linear_projection", "norm_num_groups",
    "class_embed_type", "time_embedding_type", "encoder_hid_dim",
)


def load_unet_weights(model: torch.nn.Module, path: str | os.PathLike, config: dict) -> None:
    """Fill ``model``'s parameters from ``path`` (see module doc); errors name the problem."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--model-path {path}: no such file or directory")
    if path.is_dir():
        files = _diffusers_folder_files(path, config)
        tensors = dict(_iter_keys(files))
    elif path.suffix == ".safetensors":
        tensors = dict(_iter_keys([path]))
        tensors = _single_file_mapping(tensors, path, config)
    else:
        raise UserError(f"--model-path {path}: expected a diffusers folder or a .safetensors file "
                        f"(.ckpt/.bin pickles are not loaded for safety)")
    _copy_into(model, tensors, path)


def _diffusers_folder_files(root: Path, config: dict) -> list[Path]:
    """The weight files of the UNet in a diffusers pipeline folder (or a bare unet folder)."""
    from .folders import unet_folder

    folder = unet_folder(root)
    cfg_file = folder / "config.json"
    _check_config(json.loads(cfg_file.read_text()), config, cfg_file)
    for name in INDEX_NAMES:
        index = folder / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    raise UserError(f"--model-path {folder}: has a UNet config.json but no "
                    f"diffusion_pytorch_model[.fp16].safetensors weights")


def _check_config(found: dict, expected: dict, where: Path) -> None:
    diff = [k for k in _ARCH_KEYS if k in found and k in expected
            and _norm(found[k]) != _norm(expected[k])]
    if diff:
        k = diff[0]
        raise UserError(f"--model-path {where}: UNet config does not match the model being built "
                        f"({k} is {found[k]!r}, expected {expected[k]!r}; {len(diff)} key(s) differ); "
                        f"the main command builds it from the folder's config")


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _iter_keys(files: list[Path]) -> Iterator[tuple[str, tuple[Path, str]]]:
    """(key, (file, key)) for every tensor in the safetensors files."""
    for f in files:
        try:
            names = tensor_names(f)
        except (OSError, ValueError) as err:
            raise UserError(f"--model-path {f}: not a readable safetensors file ({err})") from None
        for k in names:
            yield k, (f, k)


def _single_file_mapping(tensors: dict, path: Path, config: dict) -> dict:
    """Rename SGM keys to diffusers keys with diffusers' converter; diffusers keys pass through."""
    if any(k.startswith(SGM_PREFIX) for k in tensors):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        # values are (file, key) handles: the converter copies them to their new names
        converted = convert_ldm_unet_checkpoint(tensors, config)
        return {k: v for k, v in converted.items() if v is not None}
    if "conv_in.weight" in tensors:
        return tensors
    unet_prefixed = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    if "conv_in.weight" in unet_prefixed:
        return unet_prefixed
    raise UserError(f"--model-path {path}: no UNet weights in this file (neither diffusers keys like "
                    f"conv_in.weight nor SGM keys {SGM_PREFIX}*)")


def _copy_into(model: torch.nn.Module, tensors: dict, path: Path) -> None:
    state = model.state_dict(keep_vars=True)
    missing = [k for k in state if k not in tensors]
    if missing:
        raise UserError(f"--model-path {path}: {len(missing)} UNet weights missing (first: {missing[0]}); "
                        f"is this the right model?")
    by_file: dict[Path, dict[str, str]] = {}
    for name in state:
        f, key = tensors[name]
        by_file.setdefault(f, {})[key] = name
    with torch.no_grad():
        for f, names in by_file.items():
            try:
                for key, t in iter_tensors(f, list(names)):  # read, not mapped: peak = model + one tensor
                    target = state[names[key]]
                    if t.shape != target.shape:
                        raise UserError(f"--model-path {path}: {names[key]} has shape {tuple(t.shape)}, "
                                        f"the preset expects {tuple(target.shape)}")
                    target.copy_(t)
            except (OSError, ValueError, KeyError) as err:
                raise UserError(f"--model-path {f}: unreadable safetensors file ({err})") from None
