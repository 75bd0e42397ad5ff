"""User LoRA files: diffusers/PEFT (saved by diffusers) and kohya keys -> the deltas PEFT applies."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors.torch import save_file

from graph_passes.lora_files import LoraFileError, check_against_layers, parse_lora_arg, read_lora_file

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]


@pytest.fixture(scope="module")
def unet_with_lora():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
    deltas = {name: m.get_delta_weight("default").detach().reshape(m.base_layer.weight.shape[0], -1).numpy()
              for name, m in unet.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    return unet, deltas


def test_diffusers_saved_peft_lora_reads_as_peft_deltas(unet_with_lora, tmp_path):
    unet, expected = unet_with_lora
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers,
                                                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    deltas = read_lora_file(tmp_path / "pytorch_lora_weights.safetensors", user_scale=0.5)
    assert set(deltas) == set(expected) and len(expected) > 10
    for name, d in deltas.items():
        assert d.scale == pytest.approx(0.5 * 8 / 4)
        np.testing.assert_allclose(d.delta(), 0.5 * expected[name], rtol=1e-5, atol=1e-6)


def test_kohya_keys_with_alpha_read_as_the_same_deltas(unet_with_lora, tmp_path):
    unet, expected = unet_with_lora
    kohya = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, _, factor = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[name + (".lora_down.weight" if factor.startswith("A") else ".lora_up.weight")] = value.contiguous()
        kohya[name + ".alpha"] = torch.tensor(8.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    deltas = read_lora_file(tmp_path / "kohya.safetensors")
    assert set(deltas) == set(expected)
    for name, d in deltas.items():
        np.testing.assert_allclose(d.delta(), expected[name], rtol=1e-5, atol=1e-6)


def test_keys_that_match_no_layer_or_shape_are_errors_naming_the_key(unet_with_lora, tmp_path):
    unet, expected = unet_with_lora
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)
    deltas = read_lora_file(tmp_path / "pytorch_lora_weights.safetensors")
    shapes = {n: (e.shape[0], e.shape[1]) for n, e in expected.items()}
    check_against_layers(deltas, shapes)
    victim = sorted(shapes)[0]
    with pytest.raises(LoraFileError, match="matches no layer"):
        check_against_layers(deltas, {k: v for k, v in shapes.items() if k != victim})
    with pytest.raises(LoraFileError, match=r"lora"):
        check_against_layers(deltas, {**shapes, victim: (shapes[victim][0] + 1, shapes[victim][1])})


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(LoraFileError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(LoraFileError, match="not a readable"):
        read_lora_file(bad)
    save_file({"some.weight": torch.zeros(2)}, tmp_path / "nolora.safetensors")
    with pytest.raises(LoraFileError, match="no LoRA weights"):
        read_lora_file(tmp_path / "nolora.safetensors")


def test_lora_argument_parsing():
    assert parse_lora_arg("style.safetensors") == (__import__("pathlib").Path("style.safetensors"), 1.0)
    assert parse_lora_arg("a/b.safetensors:0.8")[1] == 0.8
    assert parse_lora_arg("c:-1.5")[1] == -1.5
