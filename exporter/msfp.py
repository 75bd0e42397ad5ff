"""MSFP: mixup-sign FP4 format and scale search per layer (arXiv 2505.21591), with MPQ-DM.

For each quantized layer, from its calibration capture (input rows X [n, K],
per-channel input ranges) and its weight W [N, K]:

1. **AAL detection** (anomalous-activation layer): the input is AAL when its
   negative range is small next to its positive one,
   ``max(x) > 0 and -min(x) <= max(AAL_RATIO * max(x), SILU_FLOOR)``.
   SiLU(x) >= -0.2785 and GELU(x) >= -0.17 for every x, so inputs produced by
   either always satisfy the second bound, whatever their scale; the first
   catches other skewed inputs. A false positive costs only search time:
   AALs search signed *and* unsigned formats and keep whichever is better.
2. **Weights**: signed FP4 (e1m2, e2m1, e3m0) with a per-output-channel scale
   ``clip_j * max|W_j| / fmt.max``. Proxy: each channel's own quantization MSE
   picks its clip (on <= ``max_cols`` sampled columns); the best ``refine_w``
   formats by proxy are refined by the layer's output MSE on calibration rows.
3. **Activations**: signed FP4 for every layer, plus unsigned FP4 with a
   zero point (ue1m3, ue2m2, ue3m1, ue4m0; zero point = calibrated min) for
   AALs; a per-tensor static scale ``clip * range / fmt.max``. Proxy: the
   tensor's own quantization MSE picks the best clip per format; the best
   ``refine_a`` formats (each with the neighbouring clips) are refined by the
   layer's output MSE with the weights already quantized.
4. **MPQ-DM** (``exporter.mixed_precision``): the search above runs with and
   without the smoothing factor; the better one by output MSE is kept, then
   N-1 / N / N+1 bits are allocated per output channel.

The exhaustive search (``SearchSpace(exhaustive=True)``) scores every format
and clip by output MSE on every captured row and output channel; the pruned
one (default) is what scales to the full SDXL UNet. Output MSE is always
measured against the full-precision layer output X W^T.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .formats import SIGNED_FP4, UNSIGNED_FP4, Format, get_format, with_bits
from .mixed_precision import allocate_bits, kurtosis, smoothing_factors
from .quantizers import NVFP4_BLOCK, NVFP4_SCALE_MAX, nvfp4_block_scale

#: AAL rule constants (see module doc)
AAL_RATIO = 0.5
SILU_FLOOR = 0.2785  # -min SiLU = 0.27846...; GELU's is 0.16997

SIGNED_FP8 = ("e4m3", "e3m4")
UNSIGNED_FP8 = ("ue4m4", "ue3m5")


def grid_round(u: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Round to ``fmt``'s grid (nearest, ties to even, saturating) in float32.

    The same values as ``fmt.quantize_torch(u, ste=False)`` for every finite
    input (tests check it on every format the search uses, ties included),
    several times faster: with e = max(floor(log2 |u|), emin), adding and
    subtracting the float32 ``2**(e + 23 - m)`` rounds |u| to a multiple of
    the format's step 2**(e - m) with the FPU's round-half-even; e comes from
    the exponent bits, so normals and subnormals take the same path.
    """
    if fmt.kind != "float":
        return fmt.quantize_torch(u.float(), ste=False)
    u = u.float()
    a = u.abs() if fmt.signed else u.clamp(min=0.0)  # unsigned: negatives -> 0
    a.clamp_(max=2.0 * fmt.max)  # everything >= 2 max saturates; keeps the magic number finite
    e = (a.view(torch.int32) >> 23).clamp_(min=fmt.emin + 127)  # biased exponent, at least emin
    magic = ((e + (23 - fmt.mbits)) << 23).view(torch.float32)
    r = (a + magic).sub_(magic).clamp_(max=fmt.max)
    return r.copysign_(u) if fmt.signed else r


def fake_quant(x: torch.Tensor, fmt: Format, scale, zero=None) -> torch.Tensor:
    """Values of :func:`exporter.quantizers.fake_quantize` (same float ops), without autograd."""
    if zero is not None and not fmt.signed:
        return zero + scale * grid_round((x - zero) / scale, fmt)
    return scale * grid_round(x / scale, fmt)


def is_aal(x_min: float, x_max: float) -> bool:
    """The AAL rule of the module doc, on a layer input's calibrated min and max."""
    return x_max > 0 and -x_min <= max(AAL_RATIO * x_max, SILU_FLOOR)


@dataclass
class SearchSpace:
    """What the per-layer search may choose from, and how hard it looks."""

    w_formats: tuple[str, ...] = SIGNED_FP4
    a_signed: tuple[str, ...] = SIGNED_FP4
    a_unsigned: tuple[str, ...] = UNSIGNED_FP4  # () = signed only (no mixup)
    a_mode: str | None = "static"  # "static" | "dynamic" | "nvfp4" | None (not quantized)
    mixed_precision: bool = True
    smoothing: bool = True
    exhaustive: bool = False
    w_clips: tuple[float, ...] = (1.0, 0.94, 0.88, 0.82, 0.75, 0.65)
    a_clips: tuple[float, ...] = (1.0, 0.85, 0.7, 0.6, 0.5, 0.42, 0.35, 0.28, 0.22, 0.16)
    refine_w: int = 2
    refine_a: int = 3
    max_cols: int = 128  # weight columns for the per-channel clip proxy
    max_rows: int = 256  # output channels for the refine steps
    proxy_elements: int = 1 << 15  # activation elements for the dynamic-mode proxy
    proxy_bins: int = 2048  # histogram bins for the static activation proxy
    mp_step: int = 8  # granularity of the mixed-precision count k
    nvfp4_linear: bool = False  # Linear layers searched in nvfp4_space(self) (Blackwell FP4)


def nvfp4_space(space: SearchSpace) -> SearchSpace:
    """The search space of a Linear layer that Blackwell runs natively (graph_passes.native_fp4):
    signed ``e2m1`` weights, every channel at 4 bits (no mixed precision, hence no MPQ-DM
    smoothing), and NVFP4 activations: signed ``e2m1`` in blocks of 16 with FP8 block scales
    under a calibrated global scale (``mode="nvfp4"``, exporter.quantizers.nvfp4_block_scale; no
    unsigned formats for AALs). That is the only activation quantizer TensorRT fuses into an FP4
    GEMM. MSFP's formats are better on asymmetric inputs; NVFP4 is what FP4 tensor cores run."""
    return dataclasses.replace(space, w_formats=("e2m1",), a_signed=("e2m1",), a_unsigned=(),
                               a_mode=space.a_mode and "nvfp4", mixed_precision=False, smoothing=False,
                               nvfp4_linear=False)


@dataclass
class LayerChoice:
    """The search's result for one layer (everything ``apply_choice`` writes into it)."""

    aal: bool
    w_format: str
    w_scale: torch.Tensor  # [N]
    w_bits: torch.Tensor  # [N] int8
    a_format: str | None
    a_mode: str | None
    a_scale: float
    a_zero: float
    smooth: torch.Tensor | None  # [C]
    sqnr_db: float  # output SQNR on the captured rows, all output channels
    mp_k: int = 0
    info: dict = field(default_factory=dict)


def _sqnr(signal: float, noise: float) -> float:
    return float("inf") if noise <= 0 else 10.0 * math.log10(max(signal, 1e-30) / noise)


class _Problem:
    """One layer's search data, with the subsamples fixed once so options compare fairly."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, space: SearchSpace, gen: torch.Generator):
        self.space = space
        n_out, k = w.shape
        full = space.exhaustive
        self.cols = None if full or k <= space.max_cols else torch.randperm(k, generator=gen)[:space.max_cols]
        self.rows = None if full or n_out <= space.max_rows else \
            torch.randperm(n_out, generator=gen)[:space.max_rows]
        # the activation proxy is a per-tensor statistic: a few thousand elements estimate it well
        n_proxy = max(16, space.proxy_elements // max(k, 1))
        self.proxy = None if full or x.shape[0] <= n_proxy else torch.randperm(x.shape[0], generator=gen)[:n_proxy]
        self.y = x @ w.T  # FP reference [n, N]
        self.y_r = self.y if self.rows is None else self.y[:, self.rows]

    def pick_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t[self.rows]

    def rows_view(self, rows: torch.Tensor) -> "_Problem":
        """The same problem restricted to some output channels (for the exhaustive clip search)."""
        view = object.__new__(_Problem)
        view.__dict__.update(self.__dict__)
        view.y = self.y[:, rows]
        return view


def _weight_scales(p: _Problem, xs: torch.Tensor, ws: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None):
    """Per-channel scales for ``fmt`` and the per-channel score they reach.

    Pruned: clip per channel by its own weight MSE on sampled columns (all
    clips at once, in cache-sized row blocks). Exhaustive: clip per channel by
    its output MSE over all rows.
    """
    amax = ws.abs().amax(1) if amax is None else amax
    clips = torch.tensor(p.space.w_clips)
    scales = torch.where(amax > 0, clips[:, None] * amax / fmt.max, torch.ones_like(amax))  # [C, N]
    if p.space.exhaustive:
        err = torch.stack([channel_errors(xs, ws, fmt, s, p.y) for s in scales])
    else:
        sub = ws if p.cols is None else ws[:, p.cols]
        err = torch.empty_like(scales)
        for r in _row_blocks(sub.shape[0], sub.shape[1] * len(clips)):
            blk = sub[r]
            err[:, r] = (fake_quant(blk, fmt, scales[:, r, None]) - blk).pow(2).sum(-1)
    best = err.argmin(0)
    return scales.gather(0, best[None])[0], err.gather(0, best[None])[0]


#: elements per block of work: small enough to stay in cache (elementwise chains are memory-bound)
BLOCK_ELEMENTS = 1 << 18


def _row_blocks(rows: int, per_row: int) -> list[slice]:
    step = max(1, BLOCK_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def channel_errors(xq: torch.Tensor, ws: torch.Tensor, fmt: Format, scale: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
    """Squared output error of each output channel: ||xq Q(w_j)^T - y_j||^2 -> [N]."""
    out = torch.empty(ws.shape[0])
    for r in _row_blocks(ws.shape[0], ws.shape[1]):
        out[r] = (xq @ fake_quant(ws[r], fmt, scale[r, None]).T - y[:, r]).pow(2).sum(0)
    return out


def _search_weights(p: _Problem, xs, ws) -> tuple[str, torch.Tensor, dict]:
    scored = []
    amax = ws.abs().amax(1)
    for name in p.space.w_formats:
        scale, err = _weight_scales(p, xs, ws, get_format(name), amax)
        scored.append((float(err.sum()), name, scale))
    scored.sort(key=lambda s: s[0])
    keep = scored if p.space.exhaustive else scored[:max(1, p.space.refine_w)]
    refined = []
    for _, name, scale in keep:
        wq = fake_quant(p.pick_rows(ws), get_format(name), p.pick_rows(scale)[:, None])
        refined.append((float((xs @ wq.T - p.y_r).pow(2).sum()), name, scale))
    err, name, scale = min(refined, key=lambda s: s[0])
    return name, scale, {"proxy": {n: e for e, n, _ in scored}, "refined": {n: e for e, n, _ in refined}}


def _act_params(fmt: Format, clip: float, lo: float, hi: float, mode: str = "static"):
    if mode == "nvfp4":  # the global scale: the calibrated absmax is the largest FP8 block scale
        return max(clip * max(abs(lo), abs(hi)) / fmt.max / NVFP4_SCALE_MAX, 1e-12), None
    if fmt.signed:
        return max(clip * max(abs(lo), abs(hi)) / fmt.max, 1e-8), None
    return max(clip * (hi - lo) / fmt.max, 1e-8), lo


def _act_quant(x: torch.Tensor, fmt: Format, mode: str, scale, zero):
    if mode == "nvfp4":
        return fake_quant(x, fmt, nvfp4_block_scale(x, torch.tensor(scale)))
    if mode == "dynamic":
        if fmt.signed:
            s = (x.abs().amax(-1, keepdim=True) / fmt.max).clamp_min(1e-8)
            return fake_quant(x, fmt, s)
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        return fake_quant(x, fmt, ((hi - lo) / fmt.max).clamp_min(1e-8), lo)
    return fake_quant(x, fmt, torch.tensor(scale), None if zero is None else torch.tensor(zero))


def _search_activations(p: _Problem, xs, wq_r, formats, lo, hi, mode, refine: bool = True) -> tuple[tuple, dict]:
    """Best (format, clip, scale, zero, error) for the activation quantizer (``refine=False``:
    the proxy's favourite alone, scored by output error)."""
    # run-time scales (per token, per block): the calibrated range only bounds them
    clips = (1.0,) if mode in ("dynamic", "nvfp4") else p.space.a_clips

    def out_err(name, ci):
        fmt = get_format(name)
        scale, zero = _act_params(fmt, clips[ci], lo, hi, mode)
        xq = _act_quant(xs, fmt, mode, scale, zero)
        return float((xq @ wq_r.T - p.y_r).pow(2).sum()), name, clips[ci], scale, zero

    if p.space.exhaustive:
        cands = [out_err(n, ci) for n in formats for ci in range(len(clips))]
        return min(cands, key=lambda c: c[0]), {"candidates": len(cands)}
    best_clip = {}
    if mode == "static":  # the tensor's own MSE, from a histogram of all its captured values
        hi = max(hi, lo + 1e-6)
        counts = torch.histc(xs, bins=p.space.proxy_bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, p.space.proxy_bins + 1)
        centers = (edges[1:] + edges[:-1]) / 2
    else:  # per-token scales: measure on sampled tokens
        xp = xs if p.proxy is None else xs[p.proxy]
    for name in formats:
        fmt = get_format(name)
        params = [_act_params(fmt, c, lo, hi, mode) for c in clips]
        if mode in ("dynamic", "nvfp4"):
            errs = [float((_act_quant(xp, fmt, mode, *params[0]) - xp).pow(2).sum())]
        else:
            scale = torch.tensor([sp for sp, _ in params])[:, None]
            zero = None if fmt.signed else torch.tensor(lo)
            errs = ((fake_quant(centers, fmt, scale, zero) - centers).pow(2) * counts).sum(1).tolist()
        ci = min(range(len(clips)), key=errs.__getitem__)
        best_clip[name] = (errs[ci], ci)
    ranked = sorted(formats, key=lambda n: best_clip[n][0])[:max(1, p.space.refine_a)]
    # the best clip of each of the top formats, plus the neighbouring clips of the very best one
    ci = best_clip[ranked[0]][1]
    pairs = {(n, best_clip[n][1]) for n in ranked}
    if refine:
        pairs |= {(ranked[0], max(ci - 1, 0)), (ranked[0], min(ci + 1, len(clips) - 1))}
    cands = [out_err(n, cj) for n, cj in sorted(pairs)]
    return min(cands, key=lambda c: c[0]), {"proxy": {n: best_clip[n][0] for n in formats},
                                            "candidates": len(cands)}


def _quick_error(p: _Problem, xs, ws, lo: float, hi: float, formats, mode) -> float:
    """Output error of a cheap configuration (first weight format at absmax scales, the
    activation proxy's favourite) on the sampled rows: enough to choose whether to smooth."""
    fmt = get_format(p.space.w_formats[0])
    w_r = p.pick_rows(ws)
    amax = w_r.abs().amax(1)
    wq_r = fake_quant(w_r, fmt, torch.where(amax > 0, amax / fmt.max, torch.ones_like(amax))[:, None])
    if mode is None:
        return float((xs @ wq_r.T - p.y_r).pow(2).sum())
    quick = dataclasses.replace(p.space, refine_a=1)
    view = object.__new__(_Problem)
    view.__dict__.update(p.__dict__, space=quick)
    return _search_activations(view, xs, wq_r, formats, lo, hi, mode, refine=False)[0][0]


def _expand(v: torch.Tensor, taps: int) -> torch.Tensor:
    """Per-channel [C] -> per-column [C * taps] (im2col order)."""
    return v if taps == 1 else v.repeat_interleave(taps)


def search_layer(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, ch_min: torch.Tensor,
                 ch_max: torch.Tensor, taps: int, space: SearchSpace, seed: int = 0) -> LayerChoice:
    """Search one layer's formats, scales, smoothing and bit allocation.

    x: [n, K] captured input rows; w: [N, K] (Conv2d weights flattened, im2col
    order); ch_min / ch_max: [C] input channel ranges over all calibration
    tokens (K = C * taps). Per-token dynamic activations need rows that are
    tokens: layers with taps > 1 (k x k convolutions, whose rows are patches)
    fall back to static.
    """
    x, w = x.float(), w.float()
    gen = torch.Generator().manual_seed(seed)
    p = _Problem(x, w, space, gen)
    aal = is_aal(float(ch_min.min()), float(ch_max.max()))
    mode = space.a_mode
    if (mode == "dynamic" and taps != 1) or (mode == "nvfp4" and (taps != 1 or x.shape[1] % NVFP4_BLOCK)):
        mode = "static"  # per-token needs token rows; NVFP4 whole blocks of 16 features
    a_formats = tuple(space.a_signed) + (tuple(space.a_unsigned) if aal else ())

    def smoothed(smooth):  # (x, w, input min, input max) with the option applied
        if smooth is None:
            return x, w, float(ch_min.min()), float(ch_max.max())
        col = _expand(smooth, taps)
        return x / col, w * col, float((ch_min / smooth).min()), float((ch_max / smooth).max())

    options = [None]
    if space.smoothing and space.mixed_precision:
        x_absmax = torch.maximum(ch_min.abs(), ch_max.abs())
        w_absmax = w.abs().amax(0).view(-1, taps).amax(1)
        options.append(smoothing_factors(x_absmax, w_absmax))
        if not space.exhaustive:  # pruned: pick the option by a quick estimate, search it alone
            quick = [_quick_error(p, *smoothed(o), a_formats, mode) for o in options]
            options = [options[min(range(len(options)), key=quick.__getitem__)]]
    results = []
    for smooth in options:
        xs, ws, lo, hi = smoothed(smooth)
        w_name, w_scale, w_info = _search_weights(p, xs, ws)
        wq_r = fake_quant(p.pick_rows(ws), get_format(w_name), p.pick_rows(w_scale)[:, None])
        if mode is None:
            act = (float((xs @ wq_r.T - p.y_r).pow(2).sum()), None, 1.0, 1.0, None)
            a_info = {}
        else:
            act, a_info = _search_activations(p, xs, wq_r, a_formats, lo, hi, mode)
        results.append((act[0], smooth, xs, ws, w_name, w_scale, act, {"weights": w_info, "acts": a_info}))
    _, smooth, xs, ws, w_name, w_scale, act, info = min(results, key=lambda r: r[0])
    info["smoothing_errors"] = [r[0] for r in results]
    _, a_name, info["a_clip"], a_scale, a_zero = act

    # per-channel output errors at the chosen width (and its neighbours for mixed precision)
    if a_name is None:
        xq = xs
    else:
        xq = _act_quant(xs, get_format(a_name), mode, a_scale, a_zero)
    w_fmt = get_format(w_name)
    err_mid = channel_errors(xq, ws, w_fmt, w_scale, p.y)
    bits = torch.full((w.shape[0],), w_fmt.bits, dtype=torch.int8)
    scale, k, total = w_scale, 0, float(err_mid.sum())
    if space.mixed_precision and w.shape[0] >= 2 * space.mp_step and w_fmt.bits >= 3:
        lo_fmt, hi_fmt = with_bits(w_fmt, w_fmt.bits - 1), with_bits(w_fmt, w_fmt.bits + 1)
        kurt = kurtosis(ws)
        # only the more kurtotic half can gain a bit and only the other half can lose one
        order = torch.argsort(kurt, descending=True, stable=True)
        top, bottom = order[:len(order) // 2], order[len(order) // 2:]
        lo_scale, hi_scale = w_scale.clone(), w_scale.clone()
        err_lo, err_hi = err_mid.clone(), err_mid.clone()
        for rows, fmt, sc, er in ((bottom, lo_fmt, lo_scale, err_lo), (top, hi_fmt, hi_scale, err_hi)):
            sc[rows] = _weight_scales(p.rows_view(rows), xs, ws[rows], fmt)[0]
            er[rows] = channel_errors(xq, ws[rows], fmt, sc[rows], p.y[:, rows])
        bits, k, total = allocate_bits(err_lo, err_mid, err_hi, kurt, w_fmt.bits, space.mp_step)
        scale = torch.where(bits > w_fmt.bits, hi_scale, torch.where(bits < w_fmt.bits, lo_scale, w_scale))
        info["mp_errors"] = {"uniform": float(err_mid.sum()), "mixed": total}
    y_full = p.y if bias is None else p.y + bias.float()
    return LayerChoice(
        aal=aal, w_format=w_name, w_scale=scale.contiguous(), w_bits=bits,
        a_format=a_name, a_mode=mode if a_name else None, a_scale=float(a_scale),
        a_zero=float(a_zero) if a_zero is not None else 0.0,
        smooth=None if smooth is None else smooth.contiguous(),
        sqnr_db=_sqnr(float(y_full.pow(2).sum()), total), mp_k=k, info=info)


def apply_choice(layer, choice: LayerChoice) -> None:
    """Write a :class:`LayerChoice` into a QuantLinear / QuantConv2d."""
    with torch.no_grad():
        layer.w_quant.set_format(choice.w_format)
        layer.w_quant.scale.copy_(choice.w_scale)
        layer.w_quant.bits.copy_(choice.w_bits)
        if choice.a_format is None:
            layer.a_quant.enabled = False
        else:
            layer.a_quant.enabled = True
            layer.a_quant.set_format(choice.a_format)
            layer.a_quant.mode = choice.a_mode
            layer.a_quant.scale.fill_(choice.a_scale)
            layer.a_quant.zero_point.fill_(0.0 if layer.a_quant.fmt.signed else choice.a_zero)
        layer.smooth = None if choice.smooth is None else choice.smooth.clone().float()
    layer.aal = choice.aal
