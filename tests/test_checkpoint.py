"""Quantized checkpoints: bit-identical reload, the JSON contract, mismatches and corruption."""
import json

import pytest
import torch

from exporter.checkpoint import JSON_NAME, TENSORS_NAME, load_checkpoint, read_checkpoint_config, save_checkpoint
from exporter.cli import UserError
from exporter.finetune import adapter_for_timestep
from exporter.layers import quant_layers
from exporter.models import get_preset, run_unet
from quant_helpers import tiny_quantized


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, report = tiny_quantized(finetune_steps=12)
    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, out, report)
    return model, out


def test_reload_is_bit_identical_at_every_adapter(saved):
    model, out = saved
    loaded = load_checkpoint(out)
    tiny = get_preset("sdxl-tiny")
    for t in (999.0, 700.0, 400.0, 50.0):
        inputs = tiny.example_inputs(batch=2, timestep=t, seed=int(t))
        with torch.no_grad():
            assert torch.equal(run_unet(loaded, inputs), run_unet(model, inputs)), t
        assert adapter_for_timestep(loaded, t) == adapter_for_timestep(model, t)
    for (name, a), (_, b) in zip(quant_layers(model), quant_layers(loaded)):
        assert a.w_quant.fmt == b.w_quant.fmt and a.a_quant.fmt == b.a_quant.fmt
        assert a.a_quant.mode == b.a_quant.mode
        assert torch.equal(a.w_quant.bits, b.w_quant.bits) and (a.smooth is None) == (b.smooth is None), name


def test_json_records_what_an_exporter_needs(saved):
    model, out = saved
    cfg, _ = read_checkpoint_config(out)
    assert cfg["preset"] == "sdxl-tiny" and cfg["scheme"] == "w4a4"
    assert cfg["base_config_hash"] == get_preset("sdxl-tiny").config_hash()
    layers = dict(quant_layers(model))
    assert set(cfg["layers"]) == set(layers)
    from safetensors import safe_open

    with safe_open(str(out / TENSORS_NAME), "pt") as f:
        keys = set(f.keys())
        assert "talora.table" in keys and f.get_tensor("conv_in.weight").dtype == torch.float16  # lossless fp16
    for name, entry in cfg["layers"].items():
        assert entry["weight"]["format"] == layers[name].w_quant.fmt.name
        assert entry["weight"]["bits"] in keys and entry["weight"]["scale"] in keys
        assert entry["activation"]["format"] == layers[name].a_quant.fmt.name
        assert entry["activation"]["mode"] == "static" and isinstance(entry["aal"], bool)
        assert entry["lora"]["kind"] == "talora" and entry["lora"]["A"] in keys
        if entry["smoothing"]:
            assert entry["smoothing"]["tensor"] in keys
    assert any(e["smoothing"] for e in cfg["layers"].values())
    assert any(e["aal"] and e["activation"]["format"].startswith("u") for e in cfg["layers"].values())
    t = cfg["talora"]
    assert t["frozen"] and t["table"] == "talora.table" and t["table_runs"][0]["from"] == 0
    assert t["table_runs"][-1]["to"] == 999 and "report" in cfg and "sqnr" not in json.dumps(t)


def test_a_checkpoint_for_another_model_is_refused(saved):
    _, out = saved
    with pytest.raises(UserError, match="do not match"):
        load_checkpoint(out, preset="sdxl")


def test_corrupt_or_missing_checkpoints_are_user_errors(saved, tmp_path):
    _, out = saved
    with pytest.raises(UserError, match="no quantized checkpoint"):
        load_checkpoint(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / JSON_NAME).write_text((out / JSON_NAME).read_text())
    data = bytearray((out / TENSORS_NAME).read_bytes())
    data[-100] ^= 0xFF
    (bad / TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        load_checkpoint(bad)
    (bad / JSON_NAME).write_text("{")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(bad)


def test_writes_are_atomic_and_leave_no_partial_files(saved):
    _, out = saved
    assert sorted(p.name for p in out.iterdir()) == [JSON_NAME, TENSORS_NAME]


def test_ptq_checkpoint_without_talora_round_trips(tmp_path):
    """Some Linear layers with NVFP4 block activations (`--nvfp4`) too: the mode and its global
    scale round-trip."""
    from export_fixtures import make_nvfp4_activations

    from exporter.layers import QuantLinear

    model, report = tiny_quantized()
    linears = [l for _, l in quant_layers(model) if isinstance(l, QuantLinear) and l.a_quant.enabled
               and l.a_quant.mode == "static" and l.weight.shape[1] % 16 == 0]
    for layer in linears[:5]:
        make_nvfp4_activations(layer.a_quant)
    save_checkpoint(model, tmp_path, report)
    loaded = load_checkpoint(tmp_path)
    assert getattr(loaded, "talora", None) is None
    assert sum(l.a_quant.mode == "nvfp4" for _, l in quant_layers(loaded)) == 5
    inputs = get_preset("sdxl-tiny").example_inputs(batch=1, timestep=321.0)
    with torch.no_grad():
        assert torch.equal(run_unet(loaded, inputs), run_unet(model, inputs))


def _edited(saved, tmp_path, edit):
    """A copy of the saved checkpoint whose JSON went through ``edit(cfg)`` (tensor file linked)."""
    _, out = saved
    cfg = json.loads((out / JSON_NAME).read_text())
    edit(cfg)
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / JSON_NAME).write_text(json.dumps(cfg))
    (folder / TENSORS_NAME).symlink_to(out / TENSORS_NAME)
    return folder


def _one_line_error(path, match, **kwargs):
    with pytest.raises(UserError, match=match) as err:
        load_checkpoint(path, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def _other_unet(cfg):  # the checkpoint claims another UNet (hash recomputed, as a careful writer would)
    from exporter.models import config_hash

    cfg["base_config"]["block_out_channels"] = [32, 64, 128]
    cfg["base_config_hash"] = config_hash(cfg["base_config"])


def _set_layer_lora_rank_0(cfg):
    next(e for e in cfg["layers"].values() if e["lora"])["lora"]["rank"] = 0


@pytest.mark.parametrize("edit,match", [
    (_other_unet, r"config and sdxl-tiny's do not match: block_out_channels is \[32, 64, 128\], sdxl-tiny has"),
    (lambda c: c["base_config"].update(layers_per_block=3), "base_config does not match base_config_hash"),
    (lambda c: c.pop("base_config_hash"), "lacks 'base_config_hash'"),
    (lambda c: c.update(preset="sd15"), "unknown model 'sd15'"),
    (lambda c: c["talora"].update(adapters=0), "adapters K >= 1"),
    (_set_layer_lora_rank_0, "bad lora entry.*positive integer rank"),
    (lambda c: next(iter(c["layers"].values()))["weight"].pop("format"), "bad or incomplete entry"),
])
def test_a_checkpoint_config_that_does_not_match_the_model_is_a_one_line_error(saved, tmp_path, edit, match):
    _one_line_error(_edited(saved, tmp_path, edit), match)


def test_the_cli_names_the_mismatch_in_one_line(saved, tmp_path, capsys):
    from exporter.cli import EXIT_INPUT, main

    _, out = saved
    assert main(["export", str(out), "--model", "sdxl", "--out", str(tmp_path / "o")]) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("export-engine: error: checkpoint")
    assert "config and sdxl's do not match" in err[0] and "(sdxl-tiny)" in err[0]
    assert not (tmp_path / "o" / "unet.onnx").exists()
