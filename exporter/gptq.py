"""Error-compensating weight rounding (GPTQ, Frantar et al. 2022, arXiv 2210.17323).

Runs after the MSFP search (and ``a8_budget``), before fine-tuning, on every
quantized layer whose Hessian the calibration accumulated
(``CalibConfig.hessians``: X^T X over every training token, fan-in up to
``MAX_FAN_IN``).

Round-to-nearest rounds each weight alone. GPTQ rounds one input column at a
time and moves the rounding error of that column onto the columns not yet
rounded, in the direction that keeps the layer's output on the calibration
inputs X unchanged (the optimal update for min ||X (W - W_q)^T||^2 given the
Hessian H = X^T X). The per-channel quantizer (format width and scale of each
output channel, from the MSFP search and the MPQ-DM bit allocation) is fixed;
only which grid point each weight takes changes.

Columns are processed in order of decreasing H diagonal ("act order": the
inputs with the most energy are rounded first, while every other column can
still absorb their error) and in blocks of ``BLOCK`` columns with one matrix
update per block (the paper's lazy batch update). H is damped by
``damp x mean(diag H)`` so that a rank-deficient H (fewer calibration rows than
inputs) still has a Cholesky factor.
"""
from __future__ import annotations

import numpy as np
import torch

from .formats import Format, with_bits

#: columns per lazy block update
BLOCK = 128
#: largest fan-in whose Hessian the calibration keeps (4096^2 float32 = 64 MB); wider layers keep
#: round-to-nearest. On SDXL this covers 696 of 785 layers and 72 % of the weights for 6 GB.
MAX_FAN_IN = 4096
#: QuantizeConfig(gptq=None), the default, turns GPTQ on when the Hessians fit in this much memory
#: (sdxl-tiny and the tiny trained UNet: a few MB; SDXL: 6 GB, so off unless --gptq)
AUTO_MAX_BYTES = 2 << 30


def keeps_hessian(fan_in: int) -> bool:
    """Whether the calibration keeps a layer's Hessian (wider layers keep round-to-nearest)."""
    return fan_in <= MAX_FAN_IN


def hessian_bytes(fan_ins) -> int:
    """Memory of the calibration's Hessians for layers of these fan-ins (float32, :func:`keeps_hessian`)."""
    return sum(4 * k * k for k in fan_ins if keeps_hessian(k))


def row_grids(fmt: Format, bits: torch.Tensor):
    """Per-output-channel grid parameters of ``fmt`` at each channel's width ``bits`` [N]
    (exporter.formats.with_bits, as WeightQuantizer does): mantissa bits, smallest biased exponent
    and largest value, each [N]."""
    by_bits = {b: with_bits(fmt, b) for b in set(bits.tolist())}
    rows = [by_bits[b] for b in bits.tolist()]
    return (torch.tensor([f.mbits for f in rows], dtype=torch.int32),
            torch.tensor([f.emin + 127 for f in rows], dtype=torch.int32),
            torch.tensor([f.max for f in rows], dtype=torch.float32))


def gptq_round(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, mbits: torch.Tensor,
               emin: torch.Tensor, fmax: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of ``w`` [N, K]: every row on its own grid (``scale`` [N] times the signed
    format given by ``mbits`` / ``emin`` / ``fmax`` [N]), columns chosen to keep X W^T for
    H = X^T X [K, K]. Returns (the rounded weights, the compensated float weights they were
    rounded from: round-to-nearest of the second gives the first).

    The column loop runs in numpy float32: it is a chain of small vector ops, where numpy's
    per-call cost is a third of torch's; the factorisation and block updates stay in torch."""
    device = w.device
    w = w.float().cpu().clone()
    n, k = w.shape
    h = h.double().cpu().clone()
    diag = h.diagonal()
    diag[diag <= 0] = 1.0  # inputs that were always zero: nothing to compensate, plain rounding
    perm = torch.argsort(diag, descending=True, stable=True)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    s = scale.float().cpu().numpy()
    mb = mbits.cpu().numpy().astype(np.int32)
    em = emin.cpu().numpy().astype(np.int32)
    fm = fmax.cpu().numpy().astype(np.float32)
    shift = (23 - mb).astype(np.int32)
    q, pre = torch.empty_like(w), torch.empty_like(w)
    qn, pn, un = q.numpy(), pre.numpy(), u.numpy()
    for i1 in range(0, k, BLOCK):
        i2 = min(i1 + BLOCK, k)
        w1 = w[:, i1:i2].numpy().copy()
        err = np.empty_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            v = col / s
            a = np.minimum(np.abs(v), 2.0 * fm)  # msfp.grid_round's arithmetic, per row
            e = np.maximum(a.view(np.int32) >> 23, em)
            magic = ((e + shift) << 23).view(np.float32)
            qc = s * np.copysign(np.minimum((a + magic) - magic, fm), v)
            qn[:, i1 + i], pn[:, i1 + i] = qc, col
            d = (col - qc) / un[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(d, un[i1 + i, i1 + i:i2])
            err[:, i] = d
        w[:, i2:] -= torch.from_numpy(err) @ u[i1:i2, i2:]
    back = torch.argsort(perm)
    return q[:, back].to(device), pre[:, back].to(device)


def gptq_layer(layer, h: torch.Tensor, keep_float: bool = False) -> dict:
    """GPTQ-round a searched QuantLinear / QuantConv2d in place, from the Hessian ``h`` [K, K] of
    its (unsmoothed) input; its quantizer (format, bits, scales, smoothing) stays as searched.

    The layer's float weight becomes GPTQ's compensated weight (the value each weight had when its
    column was rounded, over the smoothing factors), so the layer's own quantizer gives GPTQ's
    codes (checked here) while the weights keep their distances to the rounding thresholds: a
    fine-tuning LoRA delta flips codes as it did before, where on-grid weights would need half a
    grid step first. The original float weight is kept as ``layer.float_weight`` with
    ``keep_float`` (the fine-tuning teacher, exporter.finetune.float_model). Returns the
    calibration-set output error of round-to-nearest and of GPTQ, tr(D H D^T), D the weight error.
    """
    w = layer.weight.detach()
    if w.dtype != torch.float32:
        raise ValueError(f"GPTQ needs float32 weights, got {w.dtype}")
    n = w.shape[0]
    w2 = w.reshape(n, -1)
    # the smoothing factor of every weight column, laid out as the layer applies it
    col = None if layer.smooth is None else \
        (torch.ones_like(w[:1]) * layer._smooth_view(w.dim(), 1)).reshape(-1)
    ws = w2 if col is None else w2 * col
    hs = h.float() if col is None else h.float() / (col[:, None] * col[None, :])
    wq, pre = gptq_round(ws, hs, layer.w_quant.scale.detach(), *(t.to(w.device) for t in
                         row_grids(layer.w_quant.fmt, layer.w_quant.bits.cpu())))
    rtn = layer.w_quant(ws.view_as(w)).reshape(n, -1)
    with torch.no_grad():
        if keep_float:
            layer.float_weight = w.clone()
        if col is not None:  # x / c * c may miss by an ulp: where that moves a code, the grid value
            pre = pre / col
            flipped = layer.w_quant((pre * col).view_as(w)).reshape(n, -1) != wq
            pre = torch.where(flipped, wq / col, pre)
        layer.weight.copy_(pre.view_as(w))
        if not torch.equal(layer.quantized_weight().reshape(n, -1), wq):
            raise AssertionError("GPTQ weights do not quantize to GPTQ's codes")

    def err(d):
        return float(((d @ hs) * d).sum())
    return {"rtn": err(rtn - ws), "gptq": err(wq - ws)}
