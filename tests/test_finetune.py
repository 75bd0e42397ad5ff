"""TALoRA + DFA: adapters and router, the frozen timestep table, held-out DFA loss."""
import pytest
import torch

from exporter.cli import UserError
from exporter.finetune import adapter_for_timestep, add_talora, dfa_weights, freeze_router, init_router_intervals
from exporter.layers import quant_layers
from exporter.lora import TALoRA
from exporter.models import get_preset
from quant_helpers import tiny_quantized


def test_finetuning_lowers_the_heldout_dfa_loss_and_freezes_a_table():
    from exporter.quantize import quantize_model
    from quant_helpers import TEST_CALIB, tiny_fp

    # DFA weighting on the stored records: nearly every step draws the same record, so the first and
    # last step's losses compare (uniform weighting and fresh noise draw inputs whose losses differ by
    # decades). Round-to-nearest weights: the bound below was measured from them (GPTQ's lower PTQ
    # loss on this random-weight model leaves 12 steps less to gain; tests/test_gptq.py fine-tunes
    # after GPTQ)
    model, report = quantize_model("sdxl-tiny", model=tiny_fp(), finetune_steps=12, finetune_weighting="dfa",
                                   finetune_fresh_noise=False, gptq=False, **TEST_CALIB)
    ft = report.finetune
    assert ft["weighting"] == "dfa"
    # the training loss falls; the held-out loss of 12 steps on a random-weight model may not
    # (issue 11: measured going up on another machine), so it is bounded, not required to fall
    assert ft["loss_last"] < ft["loss_first"]
    assert ft["heldout_after"] < 1.1 * ft["heldout_before"]
    ctrl = model.talora
    assert ctrl.frozen and ctrl.table.shape == (1000,) and ctrl.table.dtype == torch.int64
    assert len(set(ctrl.table.tolist())) > 1  # the schedule is split between adapters
    layers = [layer for _, layer in quant_layers(model)]
    assert all(isinstance(layer.lora, TALoRA) and layer.lora.selection is ctrl.selection for layer in layers)
    assert any(float(layer.lora.B.abs().max()) > 0 for layer in layers)


def test_the_quantized_unet_selects_the_adapter_of_its_timestep():
    model, _ = tiny_quantized(finetune_steps=12)
    tiny = get_preset("sdxl-tiny")
    table = model.talora.table
    for t in (999.0, 512.4, 3.0):
        expect = int(table[int(round(t))])
        assert adapter_for_timestep(model, t) == expect
        with torch.no_grad():
            model(**_kwargs(tiny.example_inputs(batch=2, timestep=t)))
        assert model.talora.selection.index == expect
    inputs = tiny.example_inputs(batch=2)
    inputs["timestep"] = torch.tensor([999.0, 10.0])
    with pytest.raises(ValueError, match="share one timestep"):
        model(**_kwargs(inputs))


def _kwargs(inputs):
    from exporter.models import unet_kwargs

    return unet_kwargs(inputs)


def test_router_warm_start_splits_the_schedule_into_k_intervals():
    model, _ = tiny_quantized()
    ctrl = add_talora(model, rank=2, num_adapters=4)
    init_router_intervals(model, ctrl, steps=300)
    table = freeze_router(model)
    expect = torch.arange(1000) * 4 // 1000
    assert float((table == expect).float().mean()) > 0.9


def test_rank_or_adapter_count_of_zero_is_a_user_error():
    model, _ = tiny_quantized()
    with pytest.raises(UserError, match="rank"):
        add_talora(model, rank=0)
    with pytest.raises(UserError, match="adapter count K"):
        add_talora(model, num_adapters=0)


def test_dfa_weights_follow_the_squared_denoising_factor():
    w = dfa_weights([-2.0, -1.0, -0.5])
    assert w[0] / w[1] == pytest.approx(4.0) and sum(w) / 3 == pytest.approx(1.0)


def test_record_weights_dfa_or_uniform():
    from types import SimpleNamespace

    from exporter.finetune import record_weights

    calib = SimpleNamespace(records=[SimpleNamespace(dfa=d) for d in (-3.0, -1.0, -0.5)])
    assert record_weights(calib, "dfa") == pytest.approx(dfa_weights([-3.0, -1.0, -0.5]))
    assert record_weights(calib, "dfa")[0] > 5 * record_weights(calib, "dfa")[2]
    assert record_weights(calib, "uniform") == [1.0, 1.0, 1.0]
    with pytest.raises(UserError, match="weighting"):
        record_weights(calib, "snr")
    from exporter.quantize import QuantizeConfig

    with pytest.raises(UserError, match="--finetune-weighting"):
        QuantizeConfig(finetune_weighting="snr").validate()


def test_float_model_is_the_float_unet_and_restores_the_quantized_one():
    """The fresh-noise teacher: quantizers off, LoRAs detached and the original weights that GPTQ
    replaced (``float_weight``, kept while quantize_model fine-tunes) give the FP UNet's output."""
    from exporter.finetune import float_model
    from quant_helpers import tiny_fp

    model, report = tiny_quantized(finetune_steps=12)
    assert report.finetune["fresh_noise"] and report.finetune["weighting"] == "uniform"  # the defaults
    assert report.gptq["layers"] > 0  # the weights now differ from the FP UNet's
    fp = tiny_fp()
    for name, m in quant_layers(model):
        m.float_weight = fp.get_submodule(name).weight.detach().clone()
    kwargs = _kwargs(get_preset("sdxl-tiny").example_inputs(batch=2, timestep=300.0))
    with torch.no_grad():
        want = tiny_fp()(**kwargs)[0]
        quantized = model(**kwargs)[0]
        with float_model(model):
            teacher = model(**kwargs)[0]
        again = model(**kwargs)[0]
    assert torch.allclose(teacher, want, rtol=1e-4, atol=1e-5)
    assert (quantized - want).norm() > 100 * (teacher - want).norm()
    torch.testing.assert_close(again, quantized, rtol=0, atol=0)  # quantizers and LoRAs back
    assert all(isinstance(m.lora, TALoRA) and m.w_quant.enabled and m.a_quant.enabled
               for _, m in quant_layers(model))
