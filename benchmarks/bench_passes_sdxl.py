"""Graph-pass pipeline on the full SDXL export: time, peak RSS, and target sizes vs fp16 weights.

    python benchmarks/bench_passes_sdxl.py --export /tmp/sdxl-export/unet.onnx --out /tmp/sdxl-targets

Make the export with ``benchmarks/bench_export_sdxl.py`` (or ``export-engine export``). Prints a
table and writes ``benchmarks/results/passes_sdxl_<cpu>.json``. Targets (issue "Graph passes"):
plugin graph on disk <= 0.30 x the fp16 parameter bytes (5.13 GB); each target's passes <= 2 min
and <= 16 GB peak RSS on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

FP16_PARAM_BYTES = 2_567_463_684 * 2  # SDXL UNet parameters in fp16


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _size(p: Path) -> int:
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="the exported unet.onnx")
    ap.add_argument("--out", required=True, help="folder for the targets")
    ap.add_argument("--targets", default="plugin,reference")
    ap.add_argument("--no-check", action="store_true", help="skip the checker after each pass")
    args = ap.parse_args()
    from graph_passes.targets import build_target

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for target in args.targets.split(","):
        t0 = time.perf_counter()
        info = build_target(args.export, target, out / f"{target}.onnx", check=not args.no_check, quiet=True)
        seconds = time.perf_counter() - t0
        size = _size(out / f"{target}.onnx")
        rows.append({"target": target, "seconds": round(seconds, 1), "bytes": size,
                     "ratio_to_fp16": round(size / FP16_PARAM_BYTES, 4),
                     "passes": [(p["name"], round(p["seconds"], 1)) for p in info["passes"]]})
        print(f"{target:10s} {seconds:7.1f} s  {size / 1e9:6.2f} GB  {size / FP16_PARAM_BYTES:5.3f} x fp16",
              flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"cpu": _cpu_name(), "command": " ".join(["python"] + sys.argv), "export": args.export,
              "peak_rss_bytes": peak, "rows": rows}
    print(f"peak RSS {peak / 2**30:.2f} GiB (bound 16 GiB); plugin bound 0.30 x fp16")
    dest = Path(__file__).parent / "results" / f"passes_sdxl_{_cpu_name().split()[0].lower()}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
