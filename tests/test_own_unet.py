"""Bring your own UNet: diffusers folders whose config.json differs from every preset, through the
main command (`export-engine unet --model-path DIR`), verify, calibration embeddings and LoRAs."""
import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import save_file

from exporter.cli import EXIT_INPUT, EXIT_OK, UserError, main
from exporter.models import PRESETS, get_preset

# quantize cheaply; the quality of these random models is not what the tests pin down
FAST = ["--calib-samples", "2", "--calib-steps", "2", "--finetune-steps", "0", "--no-verify", "--no-build"]
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
             "beta_end": 0.02, "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def sd15_style_unet():
    """No added conditioning, conv proj_in/proj_out, widths and text width of no preset."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8).eval()


def sdxl_style_unet():
    """text_time added conditioning and linear projections, at widths of no preset."""
    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 20).eval()


def save_pipeline_folder(unet, root, scheduler=None):
    unet.save_pretrained(root / "unet")
    (root / "model_index.json").write_text("{}")
    if scheduler:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return root


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return save_pipeline_folder(sd15_style_unet(), tmp_path_factory.mktemp("sd15"), SCHEDULER)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_pipeline_folder(sdxl_style_unet(), tmp_path_factory.mktemp("sdxlish"))


def test_the_test_models_differ_from_every_preset(sd15_dir, sdxl_dir):
    for folder in (sd15_dir, sdxl_dir):
        cfg = json.loads((folder / "unet" / "config.json").read_text())
        for name, preset in PRESETS.items():
            if preset.config_file:
                assert cfg["block_out_channels"] != preset.config()["block_out_channels"], name


def test_a_folder_config_defines_the_model_and_the_preset_gives_defaults(sd15_dir, sdxl_dir):
    own = get_preset("unet").for_model_path(str(sd15_dir))
    assert own.config()["block_out_channels"] == [16, 32] and own.text_embeds_dim is None
    assert own.scheduler["beta_schedule"] == "linear"  # the folder's scheduler/ wins
    assert own.defaults("cpu").resolution == 64  # native size of a preset without its own sizes
    assert [s.name for s in own.model_inputs()] == ["sample", "timestep", "encoder_hidden_states"]
    # the unet/ folder itself works too, and a preset with its own architecture yields to the folder
    tiny_defaults = get_preset("sdxl-tiny").for_model_path(str(sdxl_dir / "unet"))
    assert tiny_defaults.config()["block_out_channels"] == [16, 32] and tiny_defaults.text_embeds_dim == 20
    assert tiny_defaults.defaults("cpu").samples == get_preset("sdxl-tiny").cpu.samples
    assert [s.name for s in tiny_defaults.model_inputs()][-2:] == ["text_embeds", "time_ids"]
    built = own.build(str(sd15_dir))
    ref = sd15_style_unet()
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), ref.state_dict().values()))


def test_folders_the_pipeline_cannot_run_are_one_line_errors(tmp_path):
    UNet2DModel(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "plain" / "unet")
    with pytest.raises(UserError, match="describes a UNet2DModel, not a UNet2DConditionModel"):
        get_preset("unet").for_model_path(str(tmp_path / "plain"))
    sd15_style_unet().save_pretrained(tmp_path / "odd" / "unet")
    cfg_file = tmp_path / "odd" / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["down_block_types"] = ["AttnDownBlock2D", "DownBlock2D"]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="'AttnDownBlock2D', an unsupported block type") as err:
        get_preset("unet").for_model_path(str(tmp_path / "odd"))
    assert "\n" not in str(err.value)
    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "one.safetensors")
    with pytest.raises(UserError, match="needs a diffusers folder with config.json"):
        get_preset("unet").for_model_path(str(tmp_path / "one.safetensors"))
    with pytest.raises(UserError, match="needs --model-path DIR"):
        get_preset("unet").config()


def test_embeddings_of_another_width_are_refused_before_anything_is_written(sd15_dir, tmp_path, capsys):
    bad = tmp_path / "clip_l.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(2, 7, 768)}, bad)
    out = tmp_path / "out"
    code = main(["unet", "--w4a4", "--model-path", str(sd15_dir), "--calib-embeddings", str(bad),
                 "--out", str(out), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT and len(err.splitlines()) == 1
    assert "768 wide but the UNet's cross_attention_dim is 24" in err
    assert not out.exists() or not any(out.iterdir())


def _reference_output(out, model_dir, seed=0):
    """reference.onnx of an export on seeded inputs (ONNX Runtime)."""
    from exporter.export import unet_example_inputs
    from exporter.parity import run_onnx

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    inputs = unet_example_inputs(unet, batch=2, height=8, width=8, text_len=5, seed=seed)
    return next(iter(run_onnx(str(out / "reference.onnx"), inputs).values()))


def _lora_files(model_dir, tmp_path):
    """The same LoRA as diffusers saves a PEFT adapter and in kohya keys (with alpha)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_v", "proj_in", "conv1", "ff.net.2"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # PEFT starts lora_B at zero: a LoRA that changes nothing proves nothing
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "peft", unet_lora_layers=convert_state_dict_to_diffusers(state),
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    kohya = {}
    for key, value in state.items():
        module, _, factor = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        kohya[name + (".lora_down.weight" if factor.startswith("A") else ".lora_up.weight")] = value.contiguous()
        kohya[name + ".alpha"] = torch.tensor(4.0)
    save_file(kohya, tmp_path / "kohya.safetensors")
    return tmp_path / "peft" / "pytorch_lora_weights.safetensors", tmp_path / "kohya.safetensors"


@pytest.mark.slow
def test_sd15_style_unet_main_command_verify_and_loras(sd15_dir, tmp_path):
    out = tmp_path / "out"
    args = ["unet", "--w4a4", "--model-path", str(sd15_dir), "--out", str(out), *FAST]
    assert main(args) == EXIT_OK
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    ckpt = json.loads((out / "checkpoint" / "quantized.json").read_text())
    assert ckpt["base_config"]["cross_attention_dim"] == 24 and ckpt["config_source"]
    assert ckpt["scheduler"]["beta_schedule"] == "linear"
    assert main(["verify", str(out), "--steps", "2", "--seeds", "1", "--no-layers"]) == EXIT_OK

    plain = _reference_output(out, sd15_dir)
    peft_file, kohya_file = _lora_files(sd15_dir, tmp_path)
    outputs = {}
    for kind, f in (("peft", peft_file), ("kohya", kohya_file)):  # quantize and export come from the cache
        assert main(args + ["--lora", f"{f}:0.7"]) == EXIT_OK
        outputs[kind] = _reference_output(out, sd15_dir)
    np.testing.assert_array_equal(outputs["peft"], outputs["kohya"])
    change = np.linalg.norm(outputs["peft"] - plain) / np.linalg.norm(plain)
    assert change > 1e-2, f"the LoRA barely changed the output ({change:.2e})"
    # layer by layer with the LoRA: every layer's output as PyTorch computes it from the graph's
    # own input (a LoRA applied twice, or not at all, is a large error, and fails verify)
    assert main(["verify", str(out), "--steps", "2", "--seeds", "1"]) == EXIT_OK
    layers = json.loads((out / "verify" / "verify.json").read_text())["layers"]
    assert layers and max(r["rel_l2"] for r in layers) < 1e-4, max(layers, key=lambda r: r["rel_l2"])


@pytest.mark.slow
def test_sdxl_style_unet_main_command_with_calibration_embeddings_and_verify(sdxl_dir, tmp_path):
    emb = tmp_path / "prompts.safetensors"
    g = torch.Generator().manual_seed(3)
    save_file({"encoder_hidden_states": torch.randn(3, 9, 24, generator=g),
               "text_embeds": torch.randn(3, 20, generator=g)}, emb)
    out = tmp_path / "out"
    assert main(["unet", "--w4a4", "--model-path", str(sdxl_dir), "--calib-embeddings", str(emb),
                 "--out", str(out), *FAST]) == EXIT_OK
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]][-2:] == ["text_embeds", "time_ids"]
    report = json.loads((out / "checkpoint" / "quantized.json").read_text())["report"]
    assert report["calibration"]["embeddings"] == str(emb)
    assert main(["verify", str(out), "--steps", "2", "--seeds", "1", "--no-layers"]) == EXIT_OK


@pytest.mark.slow
def test_an_fp16_export_with_talora_passes_verify_layer_by_layer(sdxl_dir, tmp_path):
    """fp16 (the main command's default above 1 B parameters): on the same input every layer's
    codes and output match PyTorch's fp16 model. W + s B A is summed in float32 on both sides;
    summed in fp16 by PyTorch and in fp32 by ONNX Runtime it flipped weight codes (rel L2 up to
    1.3e-2 on sdxl-tiny), and the activation codes were compared on an fp16 value while ONNX
    Runtime's quantizer read the unrounded fp32 one."""
    out = tmp_path / "out"
    assert main(["unet", "--w4a4", "--fp16", "--model-path", str(sdxl_dir), "--out", str(out),
                 *FAST, "--finetune-steps", "4"]) == EXIT_OK
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["dtype"] == "float16" and manifest["talora_table"]
    code = main(["verify", str(out), "--steps", "2", "--seeds", "6"])  # 24 inputs: a new draw of noise per input
    report = json.loads((out / "verify" / "verify.json").read_text())
    assert report["layers"] and report["worst_codes_differ"] == 0, report["failed"]
    assert report["worst_layer_out_rel_l2"] < 2e-3, report["failed"]  # fp16 rounding of the output
    assert code == EXIT_OK, report["failed"]
    assert {c["name"] for c in report["checks"]["reference"]} == {"quality", "divergence"}  # no agreement


def _tiny_tokenizer(root):
    """A CLIPTokenizer with a letters-only vocabulary (no merges): enough to encode prompts."""
    from transformers import CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz,"
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"] + list(letters) + [c + "</w>" for c in letters]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), pad_token="!",
                         model_max_length=77), len(vocab)


def _text_encoder_pipeline(kind, unet_dir, root):
    """The README recipe's input: a pipeline folder with tiny seeded text encoders (SDXL-style: two,
    hidden states 8 + 16 = the UNet's cross_attention_dim 24, pooled 20; SD 1.5-style: one, 24)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok, vocab = _tiny_tokenizer(root / "tok")

    def config(hidden, projection=None):
        return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                              projection_dim=projection or hidden, eos_token_id=1, bos_token_id=0, pad_token_id=2)

    torch.manual_seed(0)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=None, text_encoder=CLIPTextModel(config(8)), tokenizer=tok,
                                         text_encoder_2=CLIPTextModelWithProjection(config(16, 20)),
                                         tokenizer_2=tok, unet=None, scheduler=EulerDiscreteScheduler())
    else:
        pipe = StableDiffusionPipeline(vae=None, text_encoder=CLIPTextModel(config(24)), tokenizer=tok, unet=None,
                                       scheduler=EulerDiscreteScheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    model = root / "my-model"
    pipe.save_pretrained(model)
    import shutil

    shutil.copytree(unet_dir / "unet", model / "unet")
    return model


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_the_readme_recipe_turns_prompts_into_calibration_embeddings_the_unet_accepts(kind, sd15_dir, sdxl_dir,
                                                                                      tmp_path):
    """README "own weights", step 1, run as written (the python block between `python - <<'PY'`
    and `PY`) on a pipeline folder with text encoders: the file it writes has the shapes the
    calibration wants for that UNet, and calibration reads it."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from exporter.calibration import text_conditioning

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (script,) = re.findall(r"python - <<'PY'\n(.*?)\nPY\n", readme, re.S)
    model = _text_encoder_pipeline(kind, sdxl_dir if kind == "sdxl" else sd15_dir, tmp_path)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = load_file(tmp_path / "prompts.safetensors")
    assert data["encoder_hidden_states"].shape == (3, 77, 24)
    if kind == "sdxl":
        assert data["text_embeds"].shape == (3, 20)
    else:
        assert "text_embeds" not in data
    preset = get_preset("unet").for_model_path(str(model))
    ehs, pooled, _ = text_conditioning(preset, 4, str(tmp_path / "prompts.safetensors"), seed=0)
    assert ehs.shape == (4, 77, 24) and torch.equal(ehs[3], data["encoder_hidden_states"][0])
    assert (pooled is None) == (kind == "sd15")
