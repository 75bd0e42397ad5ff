"""LoRA slots for quantized layers: plain LoRA and timestep-aware LoRA (TALoRA).

Both produce a weight delta ``s * B @ A`` that the layer adds to its float
weight *before* weight quantization, so the quantized weight absorbs it.
TALoRA keeps K adapters; which one is active is decided once per UNet call by
a :class:`TimestepRouter` on the timestep embedding and shared with every
layer through an :class:`AdapterSelection`.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _check_rank(rank: int, what: str) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{what} must be a positive integer, got {rank!r}")


class LoRA(nn.Module):
    """delta = scale * B @ A with A [rank, in_features], B [out_features, rank] (B starts at 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float = 1.0):
        super().__init__()
        _check_rank(rank, "LoRA rank")
        self.scale = float(scale)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


class AdapterSelection:
    """Which TALoRA adapter is active: ``weights`` is a [K] one-hot tensor.

    A plain object (not a module) so every layer can hold the same one without
    registering it K times. The router writes it; layers read it.
    """

    def __init__(self, num_adapters: int):
        _check_rank(num_adapters, "TALoRA adapter count K")
        self.num_adapters = num_adapters
        self.weights = torch.nn.functional.one_hot(torch.tensor(0), num_adapters).float()

    def select(self, index: int) -> None:
        if not 0 <= int(index) < self.num_adapters:
            raise ValueError(f"adapter index {index} out of range 0..{self.num_adapters - 1}")
        self.weights = torch.nn.functional.one_hot(torch.tensor(int(index)), self.num_adapters).float()

    @property
    def index(self) -> int:
        return int(self.weights.argmax())


class TALoRA(nn.Module):
    """K LoRA adapters; delta = scale * sum_k w_k B_k A_k with w the selection's one-hot."""

    def __init__(self, in_features: int, out_features: int, rank: int, selection: AdapterSelection,
                 scale: float = 1.0):
        super().__init__()
        _check_rank(rank, "TALoRA rank")
        k = selection.num_adapters
        self.scale = float(scale)
        self.selection = selection
        self.A = nn.Parameter(torch.empty(k, rank, in_features))
        self.B = nn.Parameter(torch.zeros(k, out_features, rank))
        for i in range(k):
            nn.init.kaiming_uniform_(self.A[i], a=math.sqrt(5))

    @property
    def num_adapters(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        w = self.selection.weights.to(self.A.device, self.A.dtype)
        if not w.requires_grad:  # a hard choice (frozen table, inference): exactly s * B_k A_k
            k = self.selection.index
            return self.scale * (self.B[k] @ self.A[k])
        # weighted sum over adapters keeps the router's straight-through gradient
        # (B scaled first: the three-operand einsum materialised a K x out x rank x in product)
        return self.scale * torch.einsum("kor,kri->oi", self.B * w[:, None, None], self.A)


class TimestepRouter(nn.Module):
    """Small MLP from the timestep embedding to one of K adapters (hard choice, STE).

    forward(temb [B, D]) -> one-hot [K]; the whole batch shares one timestep,
    so the logits of its samples are averaged. The result is also written to
    ``selection``.
    """

    def __init__(self, embed_dim: int, selection: AdapterSelection, hidden: int = 64):
        super().__init__()
        self.selection = selection
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, selection.num_adapters))

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        logits = self.net(temb.float()).mean(0)
        soft = logits.softmax(-1)
        hard = torch.nn.functional.one_hot(soft.argmax(), soft.numel()).to(soft.dtype)
        weights = hard + soft - soft.detach()  # straight-through: hard forward, soft gradient
        self.selection.weights = weights
        return weights
