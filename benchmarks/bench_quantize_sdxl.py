"""Full SDXL UNet, PTQ with default settings: wall time and peak RSS of the quantize stage.

    .venv/bin/python benchmarks/bench_quantize_sdxl.py [--model-path P] [--out DIR] [--no-save]

Without --model-path the UNet has seeded random weights (the architecture and the cost are the
real ones). Must fit 10 minutes and 16 GB peak RSS on a 2-core CPU (issue: MSFP quantization).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path")
    ap.add_argument("--out", help="checkpoint folder (default: a temporary folder, deleted)")
    ap.add_argument("--no-save", action="store_true", help="skip writing the checkpoint")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: the CLI's, 1)")
    args = ap.parse_args()

    import torch

    from exporter.checkpoint import save_checkpoint
    from exporter.quantize import quantize_model

    peak = {"gb": 0.0}
    stop = threading.Event()

    def watch():  # sampled RSS, to say which stage the peak belongs to
        while not stop.wait(0.5):
            peak["gb"] = max(peak["gb"], _rss_gb())

    threading.Thread(target=watch, daemon=True).start()
    start = time.perf_counter()

    def progress(msg):
        print(f"[{time.perf_counter() - start:7.1f}s  rss {_rss_gb():5.1f} GB  {torch.get_num_threads()} thr  "
              f"load {os.getloadavg()[0]:.1f}] {msg}", flush=True)

    print(f"torch {torch.__version__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = quantize_model("sdxl", model_path=args.model_path, progress=progress, threads=args.threads)
    t_quant = time.perf_counter() - start
    t_save = 0.0
    if not args.no_save:
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-sdxl-"))
        t = time.perf_counter()
        progress(f"writing the checkpoint to {out}")
        save_checkpoint(model, out, report)
        t_save = time.perf_counter() - t
        size = sum(p.stat().st_size for p in out.iterdir()) / 1e9
        print(f"checkpoint: {size:.2f} GB in {t_save:.1f} s")
        if not args.out:
            shutil.rmtree(out)
    stop.set()
    total = time.perf_counter() - start
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(report.summary())
    print(f"\nquantize {t_quant:.1f} s + save {t_save:.1f} s = total {total:.1f} s "
          f"(limit 600 s); peak RSS {max_rss:.2f} GiB (limit 16 GB)")
    ok = total <= 600 and max_rss * 2**30 <= 16e9
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
