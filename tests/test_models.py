"""Model presets: SDXL's exact architecture, sdxl-tiny, weight loading (folder, single file, SGM keys)."""
import json
import warnings

import pytest
import torch
from torch import nn

from exporter.cli import UserError
from exporter.models import PRESETS, get_preset, run_unet
from quant_helpers import tiny_fp


def test_sdxl_preset_is_sdxl_base_unet_exactly():
    model = get_preset("sdxl").build_empty()  # meta device: no 10 GB allocation
    assert sum(p.numel() for p in model.parameters()) == 2_567_463_684
    assert sum(type(m) is nn.Linear for m in model.modules()) == 743
    assert sum(type(m) is nn.Conv2d for m in model.modules()) == 51
    cfg = get_preset("sdxl").config()
    assert cfg["addition_embed_type"] == "text_time" and cfg["cross_attention_dim"] == 2048


def test_sdxl_tiny_keeps_sdxl_block_types():
    sdxl, tiny = get_preset("sdxl").config(), get_preset("sdxl-tiny").config()
    for key in ("down_block_types", "up_block_types", "mid_block_type", "addition_embed_type",
                "use_linear_projection", "layers_per_block"):
        assert tiny[key] == sdxl[key], key
    assert sum(p.numel() for p in get_preset("sdxl-tiny").build_empty().parameters()) < 5_000_000


def test_model_inputs_describe_the_unet_inputs():
    specs = {s.name: s for s in get_preset("sdxl").model_inputs(batch=2)}
    assert specs["sample"].shape == (2, 4, 128, 128)
    assert specs["timestep"].shape == ()
    assert specs["encoder_hidden_states"].shape == (2, 77, 2048)
    assert specs["text_embeds"].shape == (2, 1280)
    assert specs["time_ids"].shape == (2, 6)
    tiny = get_preset("sdxl-tiny")
    inputs = tiny.example_inputs(batch=2, height=64, width=96)
    assert {k: tuple(v.shape) for k, v in inputs.items()} == {
        s.name: s.shape for s in tiny.model_inputs(batch=2, height=64, width=96)}
    with torch.no_grad():
        assert run_unet(tiny_fp(), inputs).shape == (2, 4, 8, 12)


def test_random_weights_are_seeded_fp16_exact_and_warned():
    tiny = get_preset("sdxl-tiny")
    with pytest.warns(UserWarning, match="seeded random weights"):
        a = tiny.build(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = tiny.build(seed=3)
        c = tiny.build(seed=4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert torch.equal(pa.half().float(), pa)


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'sdxl-huge'.*sdxl-tiny"):
        get_preset("sdxl-huge")
    assert set(PRESETS) >= {"sdxl", "sdxl-tiny"}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_loads_a_diffusers_folder(tmp_path, variant):
    model = tiny_fp()
    src = model.half() if variant else model
    src.save_pretrained(tmp_path / "unet", variant=variant)
    (tmp_path / "model_index.json").write_text("{}")
    loaded = get_preset("sdxl-tiny").build(model_path=str(tmp_path))
    assert _same_weights(loaded, tiny_fp())


def test_loads_single_file_with_diffusers_keys(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.half() for k, v in tiny_fp().state_dict().items()}, tmp_path / "unet.safetensors")
    assert _same_weights(get_preset("sdxl-tiny").build(model_path=str(tmp_path / "unet.safetensors")), tiny_fp())


def _sgm_name(key: str) -> str:
    """diffusers -> original SGM key for the SDXL layout (as diffusers' convert_diffusers_to_original_sdxl)."""
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for d, s in top.items():
        if key.startswith(d + "."):
            return s + key[len(d):]
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    parts = key.split(".")
    if parts[0] == "mid_block":
        idx = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[".".join(parts[1:3])]
        rest = parts[3:]
        prefix = f"middle_block.{idx}"
        kind = parts[1]
    else:
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{3 * (i + 1)}.0.op." + ".".join(rest[1:])
            prefix = f"input_blocks.{3 * i + j + 1}.{0 if kind == 'resnets' else 1}"
        else:
            if kind == "upsamplers":
                return f"output_blocks.{3 * i + 2}.{2 if i < 2 else 1}." + ".".join(rest)
            prefix = f"output_blocks.{3 * i + j}.{0 if kind == 'resnets' else 1}"
    if kind == "resnets":
        rest = [resnet.get(rest[0], rest[0])] + rest[1:]
    return prefix + "." + ".".join(rest)


def test_loads_single_file_sgm_checkpoint_via_diffusers_converter(tmp_path):
    from safetensors.torch import save_file

    state = {"model.diffusion_model." + _sgm_name(k): v.half() for k, v in tiny_fp().state_dict().items()}
    assert len(state) == len(tiny_fp().state_dict())  # the renaming is one-to-one
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2)  # VAE / text encoder keys are ignored
    state["conditioner.embedders.0.transformer.x"] = torch.zeros(2)
    save_file(state, tmp_path / "sd_xl_tiny.safetensors")
    loaded = get_preset("sdxl-tiny").build(model_path=str(tmp_path / "sd_xl_tiny.safetensors"))
    assert _same_weights(loaded, tiny_fp())


def test_a_path_without_a_unet_is_a_one_line_error(tmp_path):
    tiny = get_preset("sdxl-tiny")
    with pytest.raises(UserError, match="no UNet found"):
        tiny.build(model_path=str(tmp_path))
    with pytest.raises(UserError, match="no such file"):
        tiny.build(model_path=str(tmp_path / "missing"))
    from safetensors.torch import save_file

    save_file({"text_model.weight": torch.zeros(3)}, tmp_path / "clip.safetensors")
    with pytest.raises(UserError, match="no UNet weights in this file"):
        tiny.build(model_path=str(tmp_path / "clip.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        tiny.build(model_path=str(tmp_path / "junk.safetensors"))


def test_a_folder_with_another_unet_config_is_refused(tmp_path):
    tiny_fp().save_pretrained(tmp_path / "unet")
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [32, 64, 128]
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="block_out_channels"):
        get_preset("sdxl-tiny").build(model_path=str(tmp_path))
