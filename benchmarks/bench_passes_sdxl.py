"""Graph-pass pipeline on the full SDXL export: time, peak RSS, and target sizes vs fp16 weights.

    python benchmarks/bench_passes_sdxl.py --export /tmp/sdxl-export/unet.onnx --out /tmp/sdxl-targets

Make the export with ``benchmarks/bench_export_sdxl.py`` (or take ``OUT/onnx/unet.onnx`` of
``export-engine sdxl --w4a4 --out OUT``). Prints a table and writes
``benchmarks/results/passes_sdxl_<cpu>.json``. Targets (issue "Graph passes"):
plugin graph on disk <= 0.30 x the fp16 parameter bytes (5.13 GB); each target's passes <= 2 min
and <= 16 GB peak RSS on a 2-core CPU. Each target runs in a fresh process (as the main command
runs it), so its time includes loading the export and saving the target, and its peak is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from machine import cpu_name, cpu_tag  # benchmarks/ is on sys.path when run as a script

FP16_PARAM_BYTES = 2_567_463_684 * 2  # SDXL UNet parameters in fp16
SIZE_BOUND = 0.30  # plugin graph on disk, as a fraction of the fp16 parameter bytes
TIME_BOUND_S = 120.0
RSS_BOUND_BYTES = 16e9


def _size(p: Path) -> int:
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _one_target(export: str, target: str, out: str, check: bool) -> tuple[dict, int]:
    """One target's pass list in this (child) process: (build_target's info, peak RSS bytes)."""
    from graph_passes.targets import build_target

    info = build_target(export, target, out, check=check, quiet=True)
    return info, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="the exported unet.onnx")
    ap.add_argument("--out", required=True, help="folder for the targets")
    ap.add_argument("--targets", default="plugin,reference")
    ap.add_argument("--no-check", action="store_true", help="skip the checker after each pass")
    args = ap.parse_args()
    from exporter.stages import run_in_child

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True
    print(f"{'target':10s} {'time':>9s} {'size':>9s} {'vs fp16':>8s} {'peak RSS':>10s}")
    for target in args.targets.split(","):
        t0 = time.perf_counter()
        # each target in a fresh process, as the main command runs it: its own peak, its own time
        info, peak = run_in_child(_one_target, args.export, target, str(out / f"{target}.onnx"),
                                  not args.no_check)
        seconds = time.perf_counter() - t0
        size = _size(out / f"{target}.onnx")
        ratio = size / FP16_PARAM_BYTES
        passed = seconds <= TIME_BOUND_S and peak <= RSS_BOUND_BYTES and (target != "plugin" or ratio <= SIZE_BOUND)
        ok &= passed
        rows.append({"target": target, "seconds": round(seconds, 1), "bytes": size,
                     "ratio_to_fp16": round(ratio, 4), "peak_rss_bytes": peak, "pass": passed,
                     "passes": [(p["name"], round(p["seconds"], 1)) for p in info["passes"]]})
        print(f"{target:10s} {seconds:7.1f} s {size / 1e9:6.2f} GB {ratio:7.3f}x {peak / 1e9:7.2f} GB"
              f"  {'PASS' if passed else 'FAIL'}", flush=True)
    print(f"bounds: each target <= {TIME_BOUND_S:.0f} s and <= {RSS_BOUND_BYTES / 1e9:.0f} GB peak RSS; "
          f"plugin <= {SIZE_BOUND} x fp16 ({FP16_PARAM_BYTES / 1e9:.2f} GB)")
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "command": " ".join(["python"] + sys.argv),
              "export": args.export, "rows": rows, "pass": ok}
    dest = Path(__file__).parent / "results" / f"passes_sdxl_{cpu_tag()}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
