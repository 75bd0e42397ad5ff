"""Model presets: a name -> how to build the UNet, what it takes, how to calibrate it.

A preset is plain data plus a few small methods (diffusers style: the config is
a JSON file bundled in ``exporter/models/configs/``, the model is built from it,
weights are loaded separately). Adding ``sd15`` or a DiT later means one more
:class:`Preset` entry and its config file.

A user's diffusers folder brings its own ``config.json`` (:meth:`Preset.for_model_path`): the
folder's config defines the UNet and the preset only supplies defaults (calibration sizes,
scheduler, layers kept in higher precision). The generic ``unet`` preset has no architecture of
its own and is used that way only.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..cli import UserError

#: SDXL base 1.0's scheduler (scheduler/scheduler_config.json of the diffusers repo).
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "clip_sample": False,
    "set_alpha_to_one": False,
}

#: Layers kept in higher precision unless the user says otherwise: the first and
#: last convolutions (few weights, large effect on every pixel) and the time and
#: added (text_time) embedding MLPs (they condition every block).
SDXL_KEEP_FP = r"^(conv_in|conv_out|time_embedding\.|add_embedding\.)"


def last_up_shortcuts(config: dict) -> str | None:
    """Regex of the skip-connection shortcuts (1x1 ``conv_shortcut``) of the last up block, which
    :meth:`Preset.keep_fp_regex` adds to ``keep_fp`` by default (``QuantizeConfig.keep_fp_shortcuts``;
    ``--no-keep-fp-shortcuts`` quantizes them). Why: on a trained UNet
    (benchmarks/bench_quality.py, docs/quantization.md) these few layers cost ~40 % of the whole
    W4A4 eps-MSE loss: their input (up path concatenated with the first block's skip) is
    Gaussian-like, so 4-bit activations sit at the FP4 noise floor (~19 dB, no search or clip does
    better), and their output reaches the prediction through only GroupNorm, SiLU and the FP
    conv_out. In SDXL they are 0.7 M of 2.57 B weights and well under 1 % of the FLOPs."""
    up = config.get("up_block_types") or ()
    return rf"^up_blocks\.{len(up) - 1}\.resnets\.\d+\.conv_shortcut$" if up else None


@dataclass(frozen=True)
class InputSpec:
    """One UNet input: name, shape, dtype and meaning (for export and docs)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    description: str


@dataclass(frozen=True)
class CalibDefaults:
    """Default calibration / fine-tuning sizes for one device class."""

    samples: int
    steps: int
    resolution: int | None  # pixels (latent = resolution / 8); None: the model's native size
    finetune_steps: int
    max_tokens: int  # calibration rows kept per layer for the search


@dataclass(frozen=True)
class Preset:
    """A UNet we know how to build, load, feed and calibrate."""

    name: str
    description: str
    config_file: str | None  # bundled config; None: the config comes from the user's folder
    keep_fp: str = SDXL_KEEP_FP
    scheduler: dict = field(default_factory=lambda: dict(SDXL_SCHEDULER))
    text_len: int = 77
    cpu: CalibDefaults = CalibDefaults(2, 4, 256, 0, 128)
    cuda: CalibDefaults = CalibDefaults(8, 10, 1024, 200, 512)
    #: the UNet config of a user's model (see for_model_path); None: the bundled config_file
    own_config: dict | None = None
    #: where own_config came from (a folder), recorded in checkpoints
    config_source: str | None = None

    # ---- config -------------------------------------------------------------
    def config(self) -> dict:
        """The diffusers UNet config (a fresh copy)."""
        if self.own_config is not None:
            return copy.deepcopy(self.own_config)
        if self.config_file is None:
            raise UserError(f"model {self.name!r} needs --model-path DIR: a diffusers folder (or its unet/) "
                            "whose config.json defines the UNet")
        return json.loads(_read_config(self.config_file))

    def with_config(self, config: dict, scheduler: dict | None = None,
                    source: str | None = None) -> "Preset":
        """This preset's defaults around another UNet config (and optionally its scheduler)."""
        return dataclasses.replace(self, own_config=copy.deepcopy(config), config_source=source,
                                   scheduler=dict(scheduler) if scheduler else dict(self.scheduler))

    def for_model_path(self, model_path: str | None) -> "Preset":
        """The preset for the weights at ``model_path``: a diffusers folder's own config.json (and
        scheduler/scheduler_config.json when present) replace the preset's; single files keep the
        preset's architecture (they carry no config)."""
        from .folders import read_scheduler_config, read_unet_config

        if model_path is None or not Path(model_path).is_dir():
            if model_path is not None and self.config_file is None:
                raise UserError(f"--model-path {model_path}: model {self.name!r} needs a diffusers folder with "
                                "config.json (a single-file checkpoint has no architecture; use it with "
                                "a preset that has one, e.g. sdxl)")
            return self
        config, folder = read_unet_config(model_path)
        return self.with_config(config, read_scheduler_config(model_path), str(folder.resolve()))

    def keep_fp_regex(self, shortcuts: bool = False) -> str:
        """Layers kept in higher precision: ``keep_fp``, plus with ``shortcuts`` the last up
        block's skip shortcuts (:func:`last_up_shortcuts`) when the config is known."""
        if not shortcuts:
            return self.keep_fp
        try:
            extra = last_up_shortcuts(self.config())
        except UserError:  # the generic preset before a folder gave it a config
            extra = None
        return self.keep_fp if not extra else f"{self.keep_fp}|{extra}"

    def checkpoint_fields(self) -> dict:
        """What a quantized checkpoint records of the model (read back by :meth:`for_checkpoint`):
        the UNet config, where it came from (None: the bundled preset) and the scheduler."""
        return {"base_config": self.config(), "config_source": self.config_source,
                "scheduler": dict(self.scheduler)}

    def for_checkpoint(self, checkpoint_config: dict) -> "Preset":
        """The preset for a quantized checkpoint: one made from a user's folder carries that
        folder's UNet config (``config_source``, ``base_config``) and scheduler."""
        base = checkpoint_config.get("base_config")
        if checkpoint_config.get("config_source") and isinstance(base, dict):
            return self.with_config(base, checkpoint_config.get("scheduler"), checkpoint_config["config_source"])
        return self

    def config_hash(self) -> str:
        return config_hash(self.config())

    @property
    def text_embeds_dim(self) -> int | None:
        """Width of the pooled text embedding of text_time (SDXL-style) UNets; None for others."""
        c = self.config()
        if c.get("addition_embed_type") != "text_time":
            return None
        return c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"]

    @property
    def latent_channels(self) -> int:
        return self.config()["in_channels"]

    def defaults(self, device: str | torch.device = "cpu") -> CalibDefaults:
        d = self.cuda if torch.device(device).type == "cuda" else self.cpu
        if d.resolution is None:
            d = dataclasses.replace(d, resolution=self.config()["sample_size"] * 8)
        return d

    # ---- model --------------------------------------------------------------
    def build(self, model_path: str | None = None, seed: int = 0, device: str = "cpu",
              warn: bool = True) -> torch.nn.Module:
        """The UNet in float32 (eval mode), weights from ``model_path`` or seeded random.

        model_path: a diffusers folder (``unet/`` inside, or the unet folder
        itself) or a single-file ``.safetensors`` (diffusers or original SGM
        ``model.diffusion_model.*`` keys, fp16/bf16/fp32). Without it the
        weights are random (seed ``seed``) and rounded to fp16 like a real
        checkpoint, with a warning: such a model only exercises the pipeline.
        """
        from diffusers import UNet2DConditionModel

        from .loading import load_unet_weights

        config = self.config()
        if model_path is None:
            if warn:
                warnings.warn(
                    f"{self.name}: no --model-path given, using seeded random weights (seed {seed}); "
                    "this only exercises the pipeline, its outputs are not images",
                    UserWarning, stacklevel=2)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = UNet2DConditionModel.from_config(config)
            with torch.no_grad():
                for p in model.parameters():  # fp16-representable, like a released checkpoint
                    p.copy_(p.half().float())
        else:
            with torch.device("meta"):
                model = UNet2DConditionModel.from_config(config)
            model = model.to_empty(device="cpu")
            load_unet_weights(model, model_path, config)
        return model.float().eval().requires_grad_(False).to(device)

    def build_empty(self) -> torch.nn.Module:
        """The UNet on the meta device (no memory): for shapes, names and checkpoint loading."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(self.config())

    # ---- inputs -------------------------------------------------------------
    def model_inputs(self, batch: int = 1, height: int | None = None, width: int | None = None,
                     text_len: int | None = None) -> list[InputSpec]:
        """The UNet's inputs for a batch of ``batch`` images of height x width pixels.

        All float inputs are float32 (or the model's dtype); ``timestep`` is one
        value shared by the batch (the sampler's current timestep, in [0, 1000)).
        ``text_embeds`` and ``time_ids`` only for text_time (SDXL-style) UNets.
        """
        c = self.config()
        h, w = self._latent_hw(height, width)
        L = text_len or self.text_len
        specs = [
            InputSpec("sample", (batch, c["in_channels"], h, w), "float32",
                      "noisy latent x_t, scaled by the scheduler's scale_model_input"),
            InputSpec("timestep", (), "float32", "sampler timestep t (shared by the batch)"),
            InputSpec("encoder_hidden_states", (batch, L, c["cross_attention_dim"]), "float32",
                      "text encoder hidden states (SDXL: CLIP-L and OpenCLIP-bigG penultimate, concatenated)"),
        ]
        if self.text_embeds_dim is None:
            return specs
        return specs + [
            InputSpec("text_embeds", (batch, self.text_embeds_dim), "float32",
                      "pooled text embedding (SDXL: OpenCLIP-bigG projection)"),
            InputSpec("time_ids", (batch, 6), "float32",
                      "micro-conditioning: original h, w, crop top, left, target h, w (pixels)"),
        ]

    def example_inputs(self, batch: int = 1, height: int | None = None, width: int | None = None,
                       timestep: float = 999.0, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Seeded random inputs matching :meth:`model_inputs` (a flat dict)."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for spec in self.model_inputs(batch, height, width):
            if spec.name == "timestep":
                out[spec.name] = torch.tensor(float(timestep))
            elif spec.name == "time_ids":
                h, w = (8 * n for n in self._latent_hw(height, width))
                out[spec.name] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(batch, 1)
            else:
                out[spec.name] = torch.randn(spec.shape, generator=g)
        return {k: v.to(device) for k, v in out.items()}

    def _latent_hw(self, height: int | None, width: int | None) -> tuple[int, int]:
        size = self.config()["sample_size"] * 8
        height, width = height or size, width or size
        if height % 8 or width % 8:
            raise UserError(f"image size {height}x{width} must be a multiple of 8 pixels")
        return height // 8, width // 8


def unet_kwargs(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A flat input dict (see :meth:`Preset.model_inputs`) -> UNet2DConditionModel.forward kwargs
    (``added_cond_kwargs`` only when the dict has text_time inputs)."""
    kwargs = {
        "sample": inputs["sample"],
        "timestep": inputs["timestep"],
        "encoder_hidden_states": inputs["encoder_hidden_states"],
        "return_dict": False,
    }
    if "text_embeds" in inputs:
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    return kwargs


def run_unet(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Noise prediction for a flat input dict: [B, C, h, w]."""
    return model(**unet_kwargs(inputs))[0]


def config_hash(config: dict) -> str:
    """sha256 of the architecture keys of a diffusers config (``_``-prefixed keys ignored)."""
    arch = {k: v for k, v in sorted(config.items()) if not k.startswith("_")}
    return "sha256:" + hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _read_config(filename: str) -> str:
    return resources.files(__package__).joinpath("configs", filename).read_text()


PRESETS: dict[str, Preset] = {
    "sdxl": Preset(
        "sdxl", "Stable Diffusion XL base 1.0 UNet (2.57 B parameters)", "sdxl.json",
        cpu=CalibDefaults(samples=1, steps=4, resolution=256, finetune_steps=0, max_tokens=128),
        cuda=CalibDefaults(samples=8, steps=10, resolution=1024, finetune_steps=200, max_tokens=512),
    ),
    "sdxl-tiny": Preset(
        "sdxl-tiny", "SDXL-shaped UNet with small widths (tests and demos; seconds on a CPU)",
        "sdxl-tiny.json",
        cpu=CalibDefaults(samples=4, steps=8, resolution=128, finetune_steps=20, max_tokens=512),
        cuda=CalibDefaults(samples=8, steps=10, resolution=128, finetune_steps=200, max_tokens=1024),
    ),
    # Any UNet2DConditionModel, from its diffusers folder (--model-path DIR): calibrated at the
    # model's native size; SDXL's scheduler unless the folder has scheduler/scheduler_config.json.
    "unet": Preset(
        "unet", "any diffusers UNet2DConditionModel (--model-path DIR: its config.json defines the model)",
        None,
        cpu=CalibDefaults(samples=2, steps=4, resolution=None, finetune_steps=0, max_tokens=128),
        cuda=CalibDefaults(samples=8, steps=10, resolution=None, finetune_steps=200, max_tokens=512),
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a :class:`UserError` naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown model {name!r}; known models: {', '.join(PRESETS)}") from None
