"""Full SDXL UNet W4A4 ONNX export: wall time and peak RSS (bound: 16 GB, one extra weight copy).

    .venv/bin/python benchmarks/bench_export_sdxl.py --out /tmp/sdxl-export [--fp32] [--talora]

Builds the SDXL base UNet (the `sdxl` preset's config when exporter.models exists, else diffusers'
SDXL config below) with seeded random weights directly in the export dtype (fp16 by default, so
the weights are held once: 5.1 GB), swaps every Linear/Conv2d except conv_in/conv_out and the
time/added embeddings for W4A4 quantized layers (e2m1 weights, per-channel absmax scales; static
e2m1 activations), exports with exporter.export.export_unet and prints time and peak RSS.
Peak RSS is the process's ru_maxrss (whole run, model build included).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SDXL_EXCLUDE = r"^(conv_in|conv_out|time_embedding|add_embedding)"


def sdxl_config() -> dict:
    try:
        from exporter.models import get_preset

        return get_preset("sdxl").config()
    except ImportError:
        return dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # kB on Linux


def build(dtype: torch.dtype, seed: int = 0):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_config())
    unet = unet.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=g)
        for name, b in unet.named_buffers():
            if b.is_floating_point():
                b.zero_()
    return unet.eval().requires_grad_(False)


def quantize(unet, talora: bool) -> int:
    from exporter.layers import quant_layers, swap_quant_layers
    from exporter.lora import AdapterSelection, TALoRA

    names = swap_quant_layers(unet, exclude=SDXL_EXCLUDE)
    sel = AdapterSelection(4)
    with torch.no_grad():
        for i, (_, layer) in enumerate(quant_layers(unet)):
            w = layer.weight.detach().reshape(layer.weight.shape[0], -1).float()
            layer.w_quant.scale.copy_((w.abs().amax(1) / layer.w_quant.fmt.max).clamp_min(1e-8))
            layer.a_quant.scale.fill_(0.5)
            if talora and i % 4 == 0:
                layer.add_lora(TALoRA(layer.fan_in, layer.weight.shape[0], 4, sel).to(layer.weight.dtype))
    if talora:
        unet.adapter_table = (torch.arange(1000) * 4 // 1000).long()
    return len(names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/bench-export-sdxl", help="output folder")
    ap.add_argument("--fp32", action="store_true", help="export fp32 instead of fp16")
    ap.add_argument("--talora", action="store_true", help="add TALoRA (K=4, rank 4) to every 4th layer")
    args = ap.parse_args(argv)
    from exporter.export import export_unet

    dtype = torch.float32 if args.fp32 else torch.float16
    t0 = time.time()
    unet = build(dtype)
    n = quantize(unet, args.talora)
    param_gb = sum(p.numel() * p.element_size() for p in unet.parameters()) / 1e9
    t_build = time.time() - t0
    print(f"built SDXL UNet ({dtype}, {param_gb:.2f} GB of parameters, {n} quantized layers) in "
          f"{t_build:.0f} s; peak RSS so far {peak_rss_gb():.2f} GB", flush=True)
    t1 = time.time()
    res = export_unet(unet, Path(args.out) / "unet.onnx", batch=2, text_len=77,
                      height=32, width=32)
    t_export = time.time() - t1
    files = [res.onnx_path] + ([res.data_path] if res.data_path else [])
    size_gb = sum(f.stat().st_size for f in files) / 1e9
    peak = peak_rss_gb()
    result = {"dtype": str(dtype), "param_gb": round(param_gb, 3), "quantized_layers": n,
              "build_s": round(t_build, 1), "export_s": round(t_export, 1),
              "files_gb": round(size_gb, 3), "peak_rss_gb": round(peak, 2),
              "extra_copies": round((peak - param_gb) / param_gb, 2),
              "command": " ".join(["benchmarks/bench_export_sdxl.py"] + (argv or sys.argv[1:]))}
    print(json.dumps(result, indent=2))
    print(f"export {t_export:.0f} s, peak RSS {peak:.2f} GB (bound 16 GB): "
          f"{'OK' if peak <= 16 else 'OVER'}")
    return 0 if peak <= 16 else 1


if __name__ == "__main__":
    sys.exit(main())
