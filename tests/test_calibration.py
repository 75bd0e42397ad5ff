"""Calibration: sampler trajectories, per-layer captures, embeddings files, DFA factors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exporter.calibration import CalibConfig, collect_calibration, conv_rows, make_scheduler
from exporter.cli import UserError
from exporter.finetune import denoising_factors
from exporter.models import get_preset
from quant_helpers import tiny_fp

TINY = get_preset("sdxl-tiny")
LAYERS = ["conv_in", "down_blocks.1.resnets.0.conv1", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
          "mid_block.resnets.0.time_emb_proj", "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"]


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_trajectories_span_the_schedule_and_capture_layers(scheduler):
    cfg = CalibConfig(samples=3, steps=4, resolution=128, scheduler=scheduler, max_tokens=64, holdout=1)
    data = collect_calibration(tiny_fp(), TINY, cfg, capture=LAYERS)
    assert len(data.records) == 4 and data.train == [0, 1] and data.holdout == [2]
    ts = data.timesteps
    assert ts == sorted(ts, reverse=True) and ts[0] > 700 and ts[-1] < 300
    r = data.records[0]
    assert r.inputs["sample"].shape == (3, 4, 16, 16) and r.eps.shape == (3, 4, 16, 16)
    assert r.inputs["encoder_hidden_states"].shape == (3, 77, 64) and r.inputs["time_ids"].shape == (3, 6)
    for name in LAYERS:
        cap = data.layers[name]
        layer = tiny_fp().get_submodule(name)
        assert cap.x.shape[1] == layer.weight[0].numel() and 0 < cap.x.shape[0] <= 64 + 4
        assert bool((cap.ch_min <= cap.ch_max).all()) and cap.ch_min.numel() == layer.weight.shape[1]
        assert cap.x.min() >= cap.ch_min.min() and cap.x.max() <= cap.ch_max.max()


def test_held_out_samples_are_not_captured_and_samples_do_not_depend_on_the_count():
    with_holdout = collect_calibration(tiny_fp(), TINY, CalibConfig(samples=3, steps=2, holdout=1), capture=LAYERS)
    train_only = collect_calibration(tiny_fp(), TINY, CalibConfig(samples=2, steps=2, holdout=0), capture=LAYERS)
    for name in LAYERS:
        torch.testing.assert_close(with_holdout.layers[name].ch_max, train_only.layers[name].ch_max)
        torch.testing.assert_close(with_holdout.layers[name].ch_min, train_only.layers[name].ch_min)
    torch.testing.assert_close(with_holdout.records[1].eps[:2], train_only.records[1].eps)


def test_precomputed_embeddings_file_is_used(tmp_path):
    from safetensors.torch import save_file

    ehs, pooled = torch.randn(2, 10, 64), torch.randn(2, 32)
    save_file({"encoder_hidden_states": ehs, "text_embeds": pooled}, tmp_path / "emb.safetensors")
    cfg = CalibConfig(samples=3, steps=1, embeddings=str(tmp_path / "emb.safetensors"))
    r = collect_calibration(tiny_fp(), TINY, cfg).records[0]
    assert torch.equal(r.inputs["encoder_hidden_states"], ehs[[0, 1, 0]])
    assert torch.equal(r.inputs["text_embeds"], pooled[[0, 1, 0]])
    bad = tmp_path / "bad.safetensors"
    save_file({"encoder_hidden_states": torch.randn(2, 10, 2048), "text_embeds": pooled}, bad)
    with pytest.raises(UserError, match="2048 wide but the UNet.s cross_attention_dim is 64"):
        collect_calibration(tiny_fp(), TINY, CalibConfig(samples=1, steps=1, embeddings=str(bad)))


def test_bad_calibration_sizes_are_user_errors():
    with pytest.raises(UserError, match="samples"):
        CalibConfig(samples=0)
    with pytest.raises(UserError, match="holdout"):
        CalibConfig(samples=2, holdout=2)
    with pytest.raises(UserError, match="scheduler"):
        CalibConfig(scheduler="lms")


@pytest.mark.parametrize("stride,size", [(1, 9), (2, 8), (2, 9)])
def test_conv_rows_are_the_interior_patches_of_the_convolution(stride, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=1)
    x = torch.randn(2, 3, size, size)
    rows = conv_rows(x, conv)
    y = F.conv2d(x, conv.weight, None, stride, 1)  # [2, 5, H', W']
    # interior output positions: the receptive field lies inside the unpadded input
    pos = [i for i in range(y.shape[2]) if i * stride - 1 >= 0 and i * stride + 1 <= size - 1]
    expect = y[:, :, pos][:, :, :, pos].permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(rows @ conv.weight.reshape(5, -1).T, expect)


@pytest.mark.parametrize("kind", ["euler", "ddim"])
def test_denoising_factor_is_how_eps_enters_the_next_latent(kind):
    sched = make_scheduler(kind, TINY.scheduler)
    sched.set_timesteps(6)
    factors = denoising_factors(sched)
    x = torch.randn(1, 4, 8, 8)
    e0, e1 = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    for i, t in enumerate(sched.timesteps):
        def step(eps):  # step() is affine in eps: the difference of two steps isolates b_t
            s = copy.deepcopy(sched)
            if kind == "euler":
                s._step_index = i  # Euler tracks its position in the schedule itself
            return s.step(eps, t, x).prev_sample

        torch.testing.assert_close(step(e1) - step(e0), factors[i] * (e1 - e0), rtol=1e-4, atol=1e-4)


def test_conv_rows_subsample_gathers_a_subset_of_the_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    every = conv_rows(x, conv)
    some = conv_rows(x, conv, 7, torch.Generator().manual_seed(0))
    assert some.shape == (7, 27)
    assert all(bool((every == row).all(1).any()) for row in some)
