"""FP4Gemm kernels vs cuBLAS FP16 and FP8 on SDXL's GEMM shapes.

    python benchmarks/bench_gemm.py                 # builds the kernels for this GPU if needed

For every M in {1, 16, 64, 2048, 8192, 16384} and (N, K) of SDXL's UNet linear layers it times
    fp16   torch.matmul(x, w.t())            fp16 x fp16 -> fp16 (cuBLAS)
    fp8    torch._scaled_mm, E4M3 x E4M3 -> fp16, per-tensor scales (cuBLASLt; sm_89+)
    w4a4   fp4gemm_run: E2M1 weights packed 4-bit, E2M1 activations (static scale), fp16 in/out
    w4a16  fp4gemm_run: E2M1 weights packed 4-bit, fp16 activations
each the median of --reps runs after --warmup runs, timed with CUDA events, L2 flushed before
every run (weights do not stay in L2 from one layer to the next in a real UNet). FP4Gemm times
include every launch of a call (weight decode, activation quantization, GEMM). It prints a table
and writes benchmarks/results/<gpu>.json:
    {"gpu": name, "command": ..., "rows": [{"M", "N", "K", "fp16_ms", "fp8_ms", "w4a4_ms",
     "w4a16_ms", "speedup_w4a4", "speedup_w4a16", ...}]}   (speedups over fp16)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

M_VALUES = (1, 16, 64, 2048, 8192, 16384)
#: (N, K) of SDXL's UNet: attention projections, the 640- and 1280-wide feed-forwards
#: (GEGLU in, FF out), and cross-attention K/V from the 2048-wide text embedding
NK_SHAPES = ((640, 640), (1280, 1280), (640, 2560), (5120, 640), (1280, 5120), (10240, 1280),
             (1280, 2048), (640, 2048))
#: the issue's targets
TARGET_W4A4, TARGET_W4A16, TARGET_FLOOR = 1.6, 3.0, 0.9


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=list(M_VALUES), help="activation rows to time")
    p.add_argument("--shapes", type=str, nargs="+", default=None,
                   help="N x K shapes, e.g. 1280x5120 (default: SDXL's)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 before each run")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/<gpu>.json)")
    p.add_argument("--kernel-lib", type=Path, default=None, help="libfp4gemm_kernels.so to use")
    return p.parse_args(argv)


def gpu_file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "gpu"


class Timer:
    """Median time of a CUDA callable: events around each run, L2 flushed before it."""

    def __init__(self, torch, warmup: int, reps: int, flush: bool):
        self.torch, self.warmup, self.reps = torch, warmup, reps
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.flush_buf = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device="cuda") if flush else None

    def __call__(self, fn) -> float:
        torch = self.torch
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


class Fp4GemmCase:
    """One layer (N, K) on the GPU for the FP4Gemm kernels, W4A4 or W4A16."""

    def __init__(self, torch, lib, K: int, N: int, a_fmt: str | None, max_m: int, seed: int):
        from plugins.fp4_gemm import kernels as KL
        from plugins.fp4_gemm import reference as R

        self.torch, self.lib, self.KL = torch, lib, KL
        rng = np.random.default_rng(seed)
        self.weights, self.attrs = R.random_layer(rng, K, "e2m1", [4], [N], a_fmt, "static")
        self.layer = KL.layer_from_attrs(self.attrs)
        self.t = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in self.weights.items()}
        self.adapter = torch.zeros((), dtype=torch.int64, device="cuda")
        plan = lib.make_plan(self.layer, max_m, KL.DTYPE_F16)
        self.ws = torch.empty(max(lib.workspace_size(self.layer, plan), 1), dtype=torch.uint8, device="cuda")
        self.sems = torch.zeros(max(lib.semaphore_count(self.layer, plan), 1), dtype=torch.int32, device="cuda")

    def bind(self, x, y):
        """A callable running Y = FP4Gemm(X) for this M, and the plan's path name."""
        KL, lib, t = self.KL, self.lib, self.t
        M = x.shape[0]
        plan = lib.make_plan(self.layer, M, KL.DTYPE_F16)
        bytes_ = lib.workspace_size(self.layer, plan)
        assert bytes_ <= self.ws.numel()
        pr = KL.Problem(M=M, dtype=KL.DTYPE_F16, num_adapters=1, x=x.data_ptr(), w=t["W"].data_ptr(),
                        w_scale=t["w_scale"].data_ptr(), w_lut=t["w_lut"].data_ptr(),
                        a_scale=t["a_scale"].data_ptr(), a_zero=t["a_zero"].data_ptr(),
                        bias=t["bias"].data_ptr(), perm=t["perm"].data_ptr(), adapter=self.adapter.data_ptr(),
                        adapter_is_int32=0, y=y.data_ptr())
        stream = self.torch.cuda.current_stream().cuda_stream
        ws, sems = self.ws.data_ptr(), self.sems.data_ptr()

        def run():
            lib.run(self.layer, pr, plan, ws, bytes_, sems, stream)

        path = lib.path_name(plan.path)
        if path in ("mma", "wgmma") and plan.fp8:
            path += "-fp8"
        return run, path

    def check(self, x_np, y) -> float:
        from plugins.fp4_gemm import reference as R

        ref = R.kernel_model(x_np.astype(np.float16), self.weights, 0, self.attrs, out_dtype=np.float32)
        got = y.float().cpu().numpy()
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_gemm: PyTorch is required", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_gemm: no CUDA GPU is visible (torch.cuda.is_available() is False); this benchmark "
              "times GPU kernels and has nothing to measure here", file=sys.stderr)
        return 2

    from plugins import loader
    from plugins.fp4_gemm.kernels import KernelLibrary

    gpu = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    print(f"GPU: {gpu} (sm_{major}{minor}); building/loading the FP4Gemm kernels ...", flush=True)
    lib = KernelLibrary(args.kernel_lib) if args.kernel_lib else loader.load_kernels()
    print(f"kernels: {lib.path} (wgmma: {lib.has_wgmma}, SMALLM up to M={lib.smallm_max_m})", flush=True)
    has_fp8 = (major, minor) >= (8, 9) and hasattr(torch, "_scaled_mm")
    shapes = NK_SHAPES if not args.shapes else tuple(tuple(int(v) for v in s.lower().split("x")) for s in args.shapes)
    timer = Timer(torch, args.warmup, args.reps, not args.no_flush)
    rows = []
    header = (f"{'M':>6} {'N':>6} {'K':>6} | {'fp16':>8} {'fp8':>8} {'w4a4':>8} {'w4a16':>8} | "
              f"{'x w4a4':>7} {'x w4a16':>7} | path w4a4 / w4a16")
    print(header)
    print("-" * len(header))
    max_m = max(args.m)
    for si, (N, K) in enumerate(shapes):
        w16 = (torch.randn(N, K, device="cuda") / K ** 0.5).half()
        w8 = w16.float().to(torch.float8_e4m3fn) if has_fp8 else None
        cases = {name: Fp4GemmCase(torch, lib, K, N, a_fmt, max_m, seed=1000 * si + i)
                 for i, (name, a_fmt) in enumerate((("w4a4", "e2m1"), ("w4a16", None)))}
        for M in args.m:
            x = torch.randn(M, K, device="cuda").half()
            row = {"M": M, "N": N, "K": K}
            y16 = torch.empty(M, N, device="cuda", dtype=torch.float16)
            row["fp16_ms"] = timer(lambda: torch.matmul(x, w16.t(), out=y16))
            if has_fp8:
                mp = max(16, (M + 15) // 16 * 16)  # _scaled_mm needs M % 16 == 0: pad (timed padded)
                x8 = torch.zeros(mp, K, device="cuda", dtype=torch.float8_e4m3fn)
                x8[:M] = x.float().clamp(-448, 448).to(torch.float8_e4m3fn)
                one = torch.ones((), device="cuda")
                row["fp8_ms"] = timer(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                out_dtype=torch.float16))
            else:
                row["fp8_ms"] = None
            paths = []
            for name, case in cases.items():
                y = torch.empty(M, N, device="cuda", dtype=torch.float16)
                run, path = case.bind(x, y)
                row[f"{name}_ms"] = timer(run)
                row[f"{name}_path"] = path
                paths.append(path)
                if not args.no_check and M <= 64:
                    y.fill_(float("nan"))
                    run()
                    torch.cuda.synchronize()
                    err = case.check(x.cpu().numpy(), y)
                    row[f"{name}_rel_l2"] = err
                    if not err <= 1e-3:
                        print(f"WARNING {name} M={M} N={N} K={K}: relative L2 error {err:.2e} vs the numpy model",
                              file=sys.stderr)
            row["speedup_w4a4"] = row["fp16_ms"] / row["w4a4_ms"]
            row["speedup_w4a16"] = row["fp16_ms"] / row["w4a16_ms"]
            rows.append(row)
            fp8 = f"{row['fp8_ms']:8.4f}" if row["fp8_ms"] is not None else f"{'-':>8}"
            print(f"{M:>6} {N:>6} {K:>6} | {row['fp16_ms']:8.4f} {fp8} {row['w4a4_ms']:8.4f} "
                  f"{row['w4a16_ms']:8.4f} | {row['speedup_w4a4']:7.2f} {row['speedup_w4a16']:7.2f} | "
                  f"{' / '.join(paths)}", flush=True)
        del cases
        torch.cuda.empty_cache()

    summary = targets(rows)
    for line in summary:
        print(line)
    out = args.out or REPO / "benchmarks" / "results" / f"{gpu_file_name(gpu)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO))
                                    if Path(sys.argv[0]).resolve().is_relative_to(REPO) else sys.argv[0]]
                                   + sys.argv[1:])
    result = {"gpu": gpu, "command": command, "sm": f"{major}{minor}", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "flush_l2": not args.no_flush, "warmup": args.warmup,
              "reps": args.reps, "targets": summary, "rows": rows}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def targets(rows) -> list[str]:
    """The issue's targets, checked on the rows measured."""
    lines = []
    big = [r for r in rows if r["M"] >= 8192 and r["N"] * r["K"] >= 1280 * 1280]
    small = [r for r in rows if r["M"] <= 16]
    if big:
        worst = min(big, key=lambda r: r["speedup_w4a4"])
        lines.append(f"target W4A4 >= {TARGET_W4A4}x fp16 at M >= 8192, N*K >= 1280^2: worst "
                     f"{worst['speedup_w4a4']:.2f}x (M={worst['M']} N={worst['N']} K={worst['K']}) "
                     f"{'PASS' if worst['speedup_w4a4'] >= TARGET_W4A4 else 'FAIL'}")
    if small:
        worst = min(small, key=lambda r: r["speedup_w4a16"])
        lines.append(f"target W4A16 >= {TARGET_W4A16}x fp16 at M <= 16: worst {worst['speedup_w4a16']:.2f}x "
                     f"(M={worst['M']} N={worst['N']} K={worst['K']}) "
                     f"{'PASS' if worst['speedup_w4a16'] >= TARGET_W4A16 else 'FAIL'}")
    if rows:
        worst = min(rows, key=lambda r: min(r["speedup_w4a4"], r["speedup_w4a16"]))
        s = min(worst["speedup_w4a4"], worst["speedup_w4a16"])
        lines.append(f"target never below {TARGET_FLOOR}x fp16: worst {s:.2f}x (M={worst['M']} N={worst['N']} "
                     f"K={worst['K']}) {'PASS' if s >= TARGET_FLOOR else 'FAIL'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
