"""The main command end to end on sdxl-tiny, its cache, `verify`, `build`, and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from exporter import cli, pipeline
from exporter.cli import EXIT_INPUT, EXIT_MISSING_TOOL, EXIT_OUTPUT, main

FAST = ["--calib-samples", "1", "--calib-steps", "2", "--finetune-steps", "4"]


def run_cli(*args, cwd=None):
    """The installed console script, as a user runs it: (exit code, stdout, stderr)."""
    exe = Path(sys.executable).with_name("export-engine")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=3600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The main command from a quantized checkpoint (the quantize stage's own tests cover it; its
    cached tiny run is reused here to keep the suite fast), with the export and passes in child
    processes (--isolate, the default for SDXL). Returns (out dir, the command's stdout and
    stderr together, checkpoint)."""
    from exporter.checkpoint import save_checkpoint
    from quant_helpers import tiny_quantized

    model, report = tiny_quantized(finetune_steps=2)  # the same cached run as tests/test_export.py
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("ckpt"), report)
    out = tmp_path_factory.mktemp("export") / "sdxl-tiny-w4a4"
    code, stdout, stderr = run_cli("sdxl-tiny", "--w4a4", "--quantized", str(ckpt), "--no-build",
                                   "--no-verify", "--isolate", "--out", str(out))
    assert code == 0, stderr[-3000:]
    return out, stdout + stderr, ckpt


@pytest.mark.slow
def test_main_command_writes_every_artifact_and_a_manifest(tiny_export):
    out, stdout, _ = tiny_export
    m = json.loads((out / "manifest.json").read_text())
    for key in ("checkpoint", "export_onnx", "reference_onnx", "plugin_onnx"):
        assert (out / m["artifacts"][key]).is_file(), key
    assert m["model"] == "sdxl-tiny" and m["quantization"]["layers"] > 0
    names = [i["name"] for i in m["inputs"]]
    assert names[:3] == ["sample", "timestep", "encoder_hidden_states"]
    sample = m["inputs"][0]
    assert sample["min_shape"][0] == 2 and sample["max_shape"][0] == 8  # 1..4 images, CFG doubled
    assert m["talora_table"], "fine-tuning froze a timestep -> adapter table"
    assert all(len(h) == 64 for h in m["hashes"].values())
    assert "skipped (--no-build)" in stdout
    # nothing from the libraries underneath that a user cannot act on (torch.onnx's torchvision
    # lines, onnx-graphsurgeon's FP8-type and `colored` warnings)
    assert "torchvision" not in stdout and "[W]" not in stdout, stdout[-3000:]


@pytest.mark.slow
def test_rerun_comes_from_cache_and_verify_passes(tiny_export):
    out, _, ckpt = tiny_export
    code, stdout, stderr = run_cli("sdxl-tiny", "--w4a4", "--quantized", str(ckpt), "--no-build",
                                   "--no-verify", "--out", str(out))
    assert code == 0, stderr[-2000:]
    assert stdout.count("up to date") == 2  # export, passes (the checkpoint is given)
    code, stdout, stderr = run_cli("verify", str(out), "--steps", "2")
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    for f in ("verify.json", "verify.md", "verify.png"):
        assert (out / "verify" / f).stat().st_size > 0
    report = json.loads((out / "verify" / "verify.json").read_text())
    assert report["passed"] and not report["failed"] and report["worst_divergence"] <= 1.0
    assert {r["target"] for r in report["samples"]} == {"reference", "plugin"}
    assert {c["name"] for c in report["checks"]["reference"]} == {"quality", "divergence", "agreement"}
    assert report["layers"], "per-layer comparison ran"
    assert json.loads((out / "manifest.json").read_text())["verify"]["passed"]


@pytest.mark.slow
def test_build_makes_a_tensorrt_rtx_engine_of_every_quantized_layer(tiny_export, tmp_path):
    """`export-engine build OUT` on a CPU: TensorRT-RTX builds the all-layers W4A4 + TALoRA
    sdxl-tiny fp8 target for SM89 (the main command's default without a GPU), and its layer
    report shows every quantized Linear and Conv in FP8 but the per-token convolutions."""
    import shutil

    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by the test setup")
    src, _, _ = tiny_export
    out = tmp_path / "export"
    shutil.copytree(src, out)  # the other tests keep their --no-build export
    code, stdout, stderr = run_cli("build", str(out))
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    engine = out / m["artifacts"]["engine"]
    assert engine.stat().st_size > 1_000_000 and m["hashes"][m["artifacts"]["engine"]]
    assert "SM89" in stdout and "fp8 target" in stdout and "engine layers" in stdout
    report = json.loads((out / "reports" / "engine_layers.json").read_text())
    rows = {r["layer"]: r for r in json.loads((out / "reports" / "passes_fp8.json").read_text())["layers"]}
    for q in report["quantized"]:
        if rows[q["layer"]]["impl"] == "fp8":
            assert q["precision"] == "FP8", q
    assert sum(q["precision"] == "FP8" for q in report["quantized"]) >= 0.9 * len(report["quantized"])


def test_a_target_tensorrt_rtx_cannot_build_is_refused_before_any_work(capsys, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is installed by the test setup")
    for argv, words in ((["--target", "native", "--sm", "89"], "Blackwell"), (["--sm", "90"], "SM89"),
                        (["--target", "plugin"], "plugin layers")):
        code, err = _errors(capsys, "sdxl-tiny", "--w4a4", "--out", str(tmp_path / "o"), *argv)
        assert code == EXIT_INPUT and words in err and len(err.splitlines()) == 1, (argv, err)
        assert not (tmp_path / "o").exists()


def _errors(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def test_unknown_model_is_a_one_line_error(capsys, tmp_path):
    code, err = _errors(capsys, "sdxl-huge", "--w4a4", "--out", str(tmp_path / "o"))
    assert code == EXIT_INPUT and "unknown model 'sdxl-huge'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_batch_beyond_the_export_is_refused_before_any_work(capsys, tmp_path):
    from exporter.export import MAX_UNET_BATCH

    code, err = _errors(capsys, "sdxl-tiny", "--w4a4", "--batch", "1:1:32", "--out", str(tmp_path / "o"))
    assert code == EXIT_INPUT and len(err.splitlines()) == 1, err
    assert "UNet batch of 64" in err and f"at most {MAX_UNET_BATCH}" in err and "--batch" in err
    assert not (tmp_path / "o").exists()


def test_missing_or_corrupt_model_path(capsys, tmp_path):
    code, err = _errors(capsys, "sdxl-tiny", "--w4a4", "--model-path", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o"))
    assert code == EXIT_INPUT and "does not exist" in err and len(err.splitlines()) == 1
    bad = tmp_path / "unet.safetensors"
    bad.write_bytes(b"garbage, not safetensors")
    code, err = _errors(capsys, "sdxl-tiny", "--w4a4", "--model-path", str(bad), "--no-build",
                        "--out", str(tmp_path / "o2"), *FAST)
    assert code == EXIT_INPUT and len(err.splitlines()) == 1 and str(bad) in err


def test_corrupt_or_mismatched_lora_changes_nothing(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"existing": true}')
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    code, err = _errors(capsys, "sdxl-tiny", "--w4a4", "--lora", str(corrupt), "--out", str(out))
    assert code == EXIT_INPUT and "not a readable" in err
    wrong = tmp_path / "wrong.safetensors"
    save_file({"unet.down_blocks.9.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8),
               "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2)}, wrong)
    code, err = _errors(capsys, "sdxl-tiny", "--w4a4", "--lora", f"{wrong}:0.5", "--out", str(out))
    assert code == EXIT_INPUT and "down_blocks.9.attentions.0.proj_in.lora_A.weight" in err
    assert len(err.splitlines()) == 1
    assert sorted(os.listdir(out)) == ["manifest.json"]
    assert (out / "manifest.json").read_text() == '{"existing": true}'


def test_unwritable_out_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = _errors(capsys, "sdxl-tiny", "--w4a4", "--out", str(blocker / "sub"))
    assert code == EXIT_OUTPUT and "not writable" in err


def test_verify_or_build_on_a_folder_that_is_not_an_export(capsys, tmp_path):
    for cmd in ("verify", "build"):
        code, err = _errors(capsys, cmd, str(tmp_path))
        assert code == EXIT_INPUT and "not an export-engine export" in err


def test_explicit_build_without_tensorrt_says_what_is_missing(capsys, tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({
        "model": "sdxl-tiny", "scheme": "w4a4",
        "artifacts": {"checkpoint": "checkpoint/quantized.json", "export_onnx": "onnx/unet.onnx",
                      "reference_onnx": "reference.onnx"}}))
    (out / "reference.onnx").write_bytes(b"")
    monkeypatch.setattr(pipeline, "has_module", lambda name: False)
    code, err = _errors(capsys, "build", str(out))
    assert code == EXIT_MISSING_TOOL and "no TensorRT" in err and f"export-engine build {out}" in err


def test_help_is_there_for_a_new_user(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model-path", "--lora", "--quantized", "--target", "--sm", "--no-build", "--force"):
        assert flag in text
    assert cli.main(["list"]) == 0


def _raise_user_error(message, code):
    raise cli.UserError(message, code)


def test_a_stage_in_a_child_process_returns_its_result_or_its_error_with_the_exit_code():
    from exporter.stages import run_in_child

    assert run_in_child(pow, 3, 4) == 81
    with pytest.raises(cli.UserError) as err:
        run_in_child(_raise_user_error, "out dir not writable", EXIT_OUTPUT)
    assert str(err.value) == "out dir not writable" and err.value.exit_code == EXIT_OUTPUT


def test_a_disk_too_small_for_the_job_is_named_before_it_starts(tmp_path, monkeypatch, capsys):
    import shutil

    p = pipeline.Pipeline(pipeline.RunOptions(model="sdxl", out=str(tmp_path / "out")))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=int(5e9)))
    pipeline._warn_if_disk_is_short(p)
    said = capsys.readouterr().out
    assert "has 5.0 GB free" in said and "writes about 23 GB more" in said  # 2.57 B parameters
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=int(100e9)))
    pipeline._warn_if_disk_is_short(p)
    assert capsys.readouterr().out == ""


# -- the end-to-end criterion has teeth: planted bugs fail it, ORT's optimizations pass it ---------

def _verify_planted(tiny_export, tmp_path, edit=None, manifest_edit=None, optimize=False):
    """verify (reference graph only, no per-layer check) on a copy of the tiny export whose
    reference.onnx initializers ``edit(name -> array)`` may change."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from exporter.verify import verify_export

    src, _, _ = tiny_export
    out = tmp_path / "planted"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("plugin.onnx*", "verify"))
    m = json.loads((out / "manifest.json").read_text())
    m["artifacts"].pop("plugin_onnx", None)
    if manifest_edit:
        manifest_edit(m, tmp_path)
    (out / "manifest.json").write_text(json.dumps(m))
    if edit:
        ref = out / m["artifacts"]["reference_onnx"]
        model = onnx.load(str(ref))
        inits = {i.name: i for i in model.graph.initializer}
        for name, value in edit({n: numpy_helper.to_array(i) for n, i in inits.items()}).items():
            inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
        for f in ref.parent.glob(ref.name + "*"):
            f.unlink()
        onnx.save(model, str(ref), save_as_external_data=True, location=ref.name + ".data")
    return verify_export(out, steps=2, layers=False, quiet=True, optimize=optimize)


PLANTED = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight.dequantized_per_adapter"


@pytest.mark.slow
def test_a_wrong_scale_in_one_layer_fails_the_criterion(tiny_export, tmp_path):
    report = _verify_planted(tiny_export, tmp_path, edit=lambda w: {PLANTED: w[PLANTED] * 1.25})
    assert not report["passed"], report["checks"]
    assert report["failed"][0].startswith("reference")


@pytest.mark.slow
def test_two_talora_adapters_swapped_fail_the_criterion(tiny_export, tmp_path):
    import numpy as np

    def swap(w):
        table, per_adapter = w["adapter_table"].copy(), w[PLANTED]
        # after a short fine-tuning some adapters are still equal: swap 0 with one that is not
        other = next(a for a in range(1, per_adapter.shape[0]) if not np.array_equal(per_adapter[a], per_adapter[0]))
        zero, moved = table == 0, table == other
        table[zero], table[moved] = other, 0
        return {"adapter_table": table}

    report = _verify_planted(tiny_export, tmp_path, edit=swap)
    assert not report["passed"], report["checks"]
    assert any("agreement" in f or "divergence" in f for f in report["failed"]), report["failed"]


@pytest.mark.slow
def test_a_user_lora_the_graph_lacks_fails_the_criterion(tiny_export, tmp_path):
    def add_lora(manifest, folder):
        g = torch.Generator().manual_seed(0)
        name = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
        lora = folder / "dropped.safetensors"
        save_file({f"{name}.lora_A.weight": torch.randn(4, 64, generator=g),
                   f"{name}.lora_B.weight": torch.randn(64, 4, generator=g)}, lora)
        manifest["loras"] = [{"file": str(lora)}]  # PyTorch gets it, the graph never did

    report = _verify_planted(tiny_export, tmp_path, manifest_edit=add_lora)
    assert not report["passed"], report["checks"]


@pytest.mark.slow
def test_ort_graph_optimizations_pass_the_criterion(tiny_export, tmp_path):
    report = _verify_planted(tiny_export, tmp_path, optimize=True)
    assert report["passed"], report["failed"]
    assert report["ort_optimizations"]


def test_verify_runs_the_graphs_asked_for_and_refuses_others(tiny_export, tmp_path, capsys):
    """`verify --graphs reference` (a machine without the memory for every graph of a big UNet)
    runs only that graph and records which ran; a graph the export lacks is refused up front."""
    import shutil

    from exporter.verify import verify_export

    src, _, _ = tiny_export
    out = tmp_path / "copy"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("verify"))
    report = verify_export(out, steps=1, seeds=1, layers=False, quiet=True, graphs=["reference"])
    assert set(report["checks"]) == {"reference"} and report["graphs"] == ["reference"]
    assert json.loads((out / "manifest.json").read_text())["verify"]["graphs"] == ["reference"]
    assert main(["verify", str(out), "--graphs", "reference,engine"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "--graphs reference,engine" in err and "reference, plugin" in err
