"""Model presets (``PRESETS``), weight loading and UNet input descriptions."""
from .loading import load_unet_weights
from .presets import (PRESETS, CalibDefaults, InputSpec, Preset, config_hash, get_preset, run_unet,
                      unet_kwargs)

__all__ = ["PRESETS", "CalibDefaults", "InputSpec", "Preset", "config_hash", "get_preset",
           "load_unet_weights", "run_unet", "unet_kwargs"]
