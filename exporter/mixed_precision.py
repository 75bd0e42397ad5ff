"""MPQ-DM outlier-driven mixed precision for weights (arXiv 2412.11549, section 3.2).

1. Smoothing: per input channel i, ``smooth_i = sqrt(max|X_i| / max|W_:,i|)``;
   the layer computes ``Q_a(X / smooth) Q_w(W * smooth)^T`` (the paper's
   ``delta = 1 / smooth``: X diag(delta) . diag(delta)^-1 W^T), equal to X W^T
   before quantization. Kept as an explicit buffer on the quantized layer
   (``QuantLinear.smooth``), so it is exact after export whatever precedes it.
2. Kurtosis per output channel of the smoothed weight ranks the channels by
   how outlier-heavy they are.
3. The k most kurtotic channels get N+1 bits, the k least N-1, the rest N
   (the average stays N); k is chosen to minimise the layer's output error.
   Because the output error of a layer is a sum over output channels, the
   error of every k follows from three per-channel error vectors (one per
   width) by cumulative sums: the search over k is exact and free.
"""
from __future__ import annotations

import torch

#: smallest factor used, so dead channels (all-zero activations or weights) stay finite
_EPS = 1e-5


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel smoothing: max|X_i|**alpha / max|W_:,i|**(1 - alpha) (MPQ-DM: alpha 0.5).

    x_absmax, w_absmax: [C] float. Returns [C] float32, positive and finite;
    channels where either side is zero get 1 (nothing to balance).
    """
    x = x_absmax.float()
    w = w_absmax.float()
    s = x.clamp_min(_EPS) ** alpha / w.clamp_min(_EPS) ** (1 - alpha)
    dead = (x <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s).clamp(1e-4, 1e4)


def kurtosis(w: torch.Tensor) -> torch.Tensor:
    """Kurtosis E[(w - mu)^4] / E[(w - mu)^2]^2 of each row of ``w`` [N, K] -> [N] (3 for a Gaussian)."""
    d2 = (w.float() - w.float().mean(1, keepdim=True)).square_()
    var = d2.mean(1)
    return d2.square_().mean(1) / var.clamp_min(1e-30).square()


def allocate_bits(err_low: torch.Tensor, err_mid: torch.Tensor, err_high: torch.Tensor,
                  kurt: torch.Tensor, bits: int, step: int = 8) -> tuple[torch.Tensor, int, float]:
    """MPQ-DM bit allocation from per-channel output errors at N-1, N, N+1 bits.

    err_*: [N_out] squared output error of each channel at that width; kurt:
    [N_out]. The ``k`` channels of highest kurtosis get ``bits + 1``, the ``k``
    lowest ``bits - 1``; k runs over multiples of ``step`` up to N_out / 2.
    Returns (per-channel bits [N_out] int8, k, total error).
    """
    n = kurt.numel()
    order = torch.argsort(kurt, descending=True, stable=True)
    gain_high = (err_mid - err_high)[order].double().cumsum(0)  # from the top
    loss_low = (err_low - err_mid)[order.flip(0)].double().cumsum(0)  # from the bottom
    base = float(err_mid.double().sum())
    best_k, best = 0, base
    for k in range(step, n // 2 + 1, step):
        total = base - float(gain_high[k - 1]) + float(loss_low[k - 1])
        if total < best:
            best_k, best = k, total
    out = torch.full((n,), bits, dtype=torch.int8)
    if best_k:
        out[order[:best_k]] = bits + 1
        out[order.flip(0)[:best_k]] = bits - 1
    return out, best_k, best
