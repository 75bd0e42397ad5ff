"""`export-engine quantize`: a run end to end, the schemes, and one-line errors for bad input."""
import json
import os
import subprocess
import sys

import pytest

from exporter.cli import EXIT_INPUT, main

SMALL = ["--calib-samples", "2", "--calib-steps", "2", "--calib-resolution", "128"]


def _run(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_quantize_writes_a_checkpoint_and_report(tmp_path):
    r = _run(["quantize", "sdxl-tiny", "--w4a4", *SMALL, "--finetune-steps", "2", "--out", "q"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "seeded random weights" in r.stderr and "Traceback" not in r.stderr
    assert "layers quantized" in r.stdout and "fine-tune step 2/2" in r.stdout
    out = tmp_path / "q"
    cfg = json.loads((out / "quantized.json").read_text())
    report = json.loads((out / "quantize_report.json").read_text())
    assert cfg["scheme"] == "w4a4" and cfg["talora"]["adapters"] == 4
    assert len(report["layers"]) == len(cfg["layers"]) == 254  # 257 less the last up block's 3 shortcuts
    assert {"conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"} <= set(report["kept_fp"])


@pytest.mark.parametrize("scheme,a_format", [("w4a8", ("e4m3", "e3m4", "ue4m4", "ue3m5")), ("w4a16", (None,))])
def test_w4a8_and_w4a16(tmp_path, scheme, a_format):
    r = _run(["quantize", "sdxl-tiny", f"--{scheme}", *SMALL, "--finetune-steps", "0", "--quiet",
              "--include", r"^mid_block\.", "--out", "q"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("quantized.json")
    cfg = json.loads((tmp_path / "q" / "quantized.json").read_text())
    assert all(n.startswith("mid_block.") for n in cfg["layers"])
    assert {e["activation"]["format"] for e in cfg["layers"].values()} <= set(a_format)


def test_a8_budget_flag(tmp_path):
    r = _run(["quantize", "sdxl-tiny", "--w4a4", *SMALL, "--finetune-steps", "0", "--quiet", "--a8-budget", "1",
              "--include", r"^mid_block\.", "--out", "q"], tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "q" / "quantized.json").read_text())
    report = json.loads((tmp_path / "q" / "quantize_report.json").read_text())
    assert {e["activation"]["format"] for e in cfg["layers"].values()} == {"e4m3"}
    assert report["config"]["a8_budget"] == 1.0 and report["a8"]["macs_share"] == 1.0


@pytest.mark.parametrize("args,message", [
    (["quantize", "sdxl-huge", "--w4a4"], "unknown model 'sdxl-huge'; known models: sdxl, sdxl-tiny"),
    (["quantize", "sdxl-tiny", "--w4a4", "--model-path", "nowhere"], "--model-path nowhere: no such file or directory"),
    (["quantize", "sdxl-tiny", "--w4a4", "--lora-rank", "0"], "--lora-rank must be a positive integer, got 0"),
    (["quantize", "sdxl-tiny", "--w4a4", "--adapters", "0"], "--adapters (TALoRA K) must be a positive integer, got 0"),
    (["quantize", "sdxl-tiny", "--w4a4", "--calib-samples", "0"], "--calib-samples must be a positive integer"),
    (["quantize", "sdxl-tiny", "--w4a4", "--include", "("], "not a valid regular expression"),
    (["quantize", "sdxl-tiny", "--w4a4", "--threads", "0"], "--threads must be a positive integer, got 0"),
    (["quantize", "sdxl-tiny", "--w4a4", "--a8-budget", "2"], "--a8-budget must be a fraction of the MACs"),
    (["quantize", "sdxl-tiny", "--w4a8", "--a8-budget", "0.1"], "scheme w4a8 has no 4-bit activations"),
])
def test_bad_input_is_one_line_with_an_exit_code(capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)  # the default --out is models/<MODEL>-<scheme> under the current folder
    assert main(args) == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("export-engine: error:")
    assert list(tmp_path.iterdir()) == []  # refused before anything was built or written


def test_zero_lora_rank_or_adapters_fail_before_the_model_is_built():
    from exporter.cli import UserError
    from exporter.quantize import quantize_model

    for kwargs, message in (({"lora_rank": 0}, "--lora-rank"), ({"adapters": 0}, "TALoRA K")):
        with pytest.raises(UserError, match=message):
            quantize_model("sdxl-tiny", model_path="/nonexistent", finetune_steps=0, **kwargs)


def test_a_model_path_without_a_unet(capsys, tmp_path):
    (tmp_path / "vae").mkdir()
    assert main(["quantize", "sdxl-tiny", "--w4a4", "--model-path", str(tmp_path), "--out", str(tmp_path / "q")]) \
        == EXIT_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--model-path {tmp_path}: no UNet found" in err[0]


def test_list_shows_the_presets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sdxl-tiny" in out and "Stable Diffusion XL base 1.0" in out


def test_the_checkpoint_depends_on_the_command_not_on_the_machine(tmp_path):
    """One core vs a torch started with 3 threads: the same bytes. Fine-tuning is included, since its
    backward pass is where the thread count changed results before."""
    import shutil

    args = ["quantize", "sdxl-tiny", "--w4a4", *SMALL, "--finetune-steps", "2", "--quiet"]

    def run(name, prefix=(), omp="1", extra=()):
        r = subprocess.run([*prefix, sys.executable, "-m", "exporter.cli", *args, *extra, "--out", name],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": omp})
        assert r.returncode == 0, r.stderr
        folder = tmp_path / name
        metrics = json.loads((folder / "quantize_report.json").read_text())["metrics"]
        return (folder / "quantized.safetensors").read_bytes(), metrics

    one_core = run("one", prefix=("taskset", "-c", "0") if shutil.which("taskset") else ())
    three = run("three", omp="3")
    assert one_core[0] == three[0] and one_core[1] == three[1]
    assert one_core[1]["finetuned_dfa_loss"] > 0
    # the check can fail: another thread count is another (valid) checkpoint
    assert run("two", extra=("--threads", "2"))[0] != one_core[0]


def test_the_summary_says_when_fine_tuning_made_the_model_worse():
    from exporter.quantize import QuantizeReport

    def summary(ptq, tuned, random_weights=False):
        return QuantizeReport(preset="sdxl-tiny", scheme="w4a4", config={}, base_config_hash="",
                              random_weights=random_weights, calibration={"holdout": [3]},
                              metrics={"ptq_eps_sqnr_db": ptq, "finetuned_eps_sqnr_db": tuned}).summary()

    worse = summary(19.22, 18.75, random_weights=True)
    assert "fine-tuning lowered the eps SQNR on the held-out samples (18.75 dB, PTQ 19.22 dB)" in worse
    assert "--finetune-steps 0" in worse and "seeded random weights" in worse
    assert "note:" not in summary(19.22, 19.5)
