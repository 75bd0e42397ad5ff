"""How far can 4-bit activations go? Upper bounds for W4A4 on the trained tiny UNet (issue #12).

    PYTHONPATH=. .venv/bin/python benchmarks/train_tiny_unet.py        # once: models/tiny-trained
    PYTHONPATH=. .venv/bin/python benchmarks/bench_activation_bounds.py [--model models/tiny-trained]

The default W4A4 PTQ model (real calibration embeddings, bench_quality.py's variant (bs)) is
quantized once; then its activation quantizers are replaced, in PyTorch only, by schemes no
export runs today, and each is scored by bench_quality's eps-MSE ratio to fp32:

  block16 (convs | linears | all)  e2m1 values in blocks of 16 input channels, each block's scale
                an FP8 E4M3 value times a per-call global scale (NVFP4's layout; for a
                convolution the blocks run along the channels of each pixel, the K blocks of its
                im2col GEMM). Convolutions have no such quantizer in any target: an upper bound.
  oracle scale  every call's own MSE-optimal per-tensor scale (16 clips of its range; unsigned
                formats keep their calibrated zero point): a bound on any per-timestep or
                otherwise input-dependent per-tensor scale.

The weights (MSFP formats, GPTQ) stay as searched. Writes benchmarks/results/activation_bounds_<cpu>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_quality as bq  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from exporter.formats import get_format  # noqa: E402
from exporter.layers import QuantConv2d, quant_layers  # noqa: E402
from exporter.quantizers import NVFP4_BLOCK, NVFP4_SCALE_MAX, fake_quantize  # noqa: E402
from machine import cpu_name, cpu_tag  # noqa: E402

E2M1 = get_format("e2m1")
CLIPS = torch.linspace(0.25, 1.0, 16)


def block16(q):
    """NVFP4-style blocks along the input channels; the global scale from this call's range."""
    def forward(x):
        if not q.enabled:
            return x
        n, c = x.shape[0], x.shape[1]
        xt = x.permute(0, 2, 3, 1).reshape(n, -1, c) if x.dim() == 4 else (x if x.dim() == 3 else x[None])
        g = (xt.abs().amax() / E2M1.max / NVFP4_SCALE_MAX).clamp_min(1e-12)
        amax = F.max_pool1d(xt.abs().float(), NVFP4_BLOCK, NVFP4_BLOCK)
        s = (amax / E2M1.max / g).clamp(max=NVFP4_SCALE_MAX).to(torch.float8_e4m3fn).float() * g
        s = F.interpolate(torch.where(s > 0, s, torch.ones_like(s)), scale_factor=NVFP4_BLOCK, mode="nearest")
        y = fake_quantize(xt, E2M1, s)
        if x.dim() == 4:
            return y.reshape(n, x.shape[2], x.shape[3], c).permute(0, 3, 1, 2)
        return y if x.dim() == 3 else y[0]
    return forward


def oracle_scale(q):
    """This call's MSE-optimal per-tensor scale (static quantizers only)."""
    def forward(x):
        if not q.enabled or q.mode != "static":
            return type(q).forward(q, x)
        xf, fmt = x.float(), q.fmt
        z = None if fmt.signed else q.zero_point.detach()
        base = xf.abs().amax() / fmt.max if fmt.signed else (xf.amax() - z) / fmt.max
        best = min((fake_quantize(xf, fmt, (base * c).clamp_min(1e-12), z) for c in CLIPS),
                   key=lambda y: float(((y - xf) ** 2).sum()))
        return best.to(x.dtype)
    return forward


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/tiny-trained")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/activation_bounds_<cpu>.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from diffusers import UNet2DConditionModel

    from exporter.models.presets import get_preset

    folder = Path(args.model)
    fp = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    held = bq.HeldOut(folder, get_preset("unet").for_model_path(str(folder)).scheduler)
    fp_mse = bq.eps_mse(lambda f: bq.run_torch(fp, f), held)
    settings = argparse.Namespace(calib_samples=10, calib_steps=8, max_tokens=512, seed=0)
    t0 = time.perf_counter()
    model, _ = bq.quantize(fp, folder, settings, str(folder / "calib_embeddings.safetensors"), 0)
    layers = list(quant_layers(model))
    default = {name: layer.a_quant.forward for name, layer in layers}

    def score(label, replace):
        for name, layer in layers:
            layer.a_quant.forward = replace(name, layer) or default[name]
        ratio = sum(bq.eps_mse(lambda f: bq.run_torch(model, f), held).values()) / sum(fp_mse.values())
        print(f"{label:48s} {ratio:7.3f}", flush=True)
        return {"variant": label, "ratio": ratio}

    def blocks(kind):
        def replace(name, layer):
            is_conv = isinstance(layer, QuantConv2d)
            wrong_kind = (kind == "convs" and not is_conv) or (kind == "linears" and is_conv)
            if layer.weight.shape[1] % NVFP4_BLOCK or wrong_kind:
                return None
            return block16(layer.a_quant)
        return replace

    print(f"{'activations (weights as searched: MSFP + GPTQ)':48s} {'ratio':>7s}")
    rows = [score("default W4A4 PTQ (per-tensor static)", lambda n, l: None),
            score("block16, convolutions only", blocks("convs")),
            score("block16, Linear layers only", blocks("linears")),
            score("block16, every layer", blocks("all")),
            score("oracle per-call per-tensor scale", lambda n, l: oracle_scale(l.a_quant))]
    result = {"cpu": cpu_name(), "command": " ".join(["python"] + sys.argv), "model": str(folder),
              "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out or Path(__file__).parent / "results" /
               f"activation_bounds_{cpu_tag()}.json")
    from exporter.atomic import atomic_write_json

    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
