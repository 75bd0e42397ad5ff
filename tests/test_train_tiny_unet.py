"""benchmarks/train_tiny_unet.py: seeded data and a folder the main command accepts (a few seconds)."""
import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file

from exporter.calibration import text_conditioning
from exporter.models import get_preset

_spec = importlib.util.spec_from_file_location(
    "train_tiny_unet", Path(__file__).resolve().parents[1] / "benchmarks" / "train_tiny_unet.py")
train_tiny_unet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tiny_unet)


def test_the_procedural_dataset_is_deterministic_and_class_dependent():
    labels = torch.arange(10)
    a = train_tiny_unet.make_latents(labels, torch.Generator().manual_seed(0))
    b = train_tiny_unet.make_latents(labels, torch.Generator().manual_seed(0))
    assert a.shape == (10, 4, 16, 16) and torch.equal(a, b)
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(float("inf")).min() > 1.0  # classes differ


def test_the_saved_folder_is_a_unet_preset_model_with_readable_embeddings(tmp_path):
    out = tmp_path / "tiny"
    assert train_tiny_unet.main(["--steps", "2", "--batch", "2", "--heldout", "4", "--out", str(out)]) == 0
    preset = get_preset("unet").for_model_path(str(out))
    assert preset.text_embeds_dim == train_tiny_unet.POOLED_DIM
    assert preset.scheduler["beta_schedule"] == "scaled_linear"
    ehs, pooled, time_ids = text_conditioning(preset, 3, str(out / "calib_embeddings.safetensors"), 0)
    assert ehs.shape == (3, train_tiny_unet.TEXT_LEN, train_tiny_unet.TEXT_DIM) and time_ids.shape == (3, 6)
    held = load_file(out / "heldout.safetensors")
    assert held["noise"].shape == (5, 4, 4, 16, 16)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]
