"""Dense packing of 2..8-bit codes along one axis (the GEMM reduction axis).

One layout for every width: an LSB-first bit stream. Element ``i`` of a row
occupies stream bits ``[i*b, (i+1)*b)``; byte ``j`` holds stream bits
``[8j, 8j+8)`` with the lower stream bit in the lower byte bit. A row of
``L`` codes takes ``ceil(L*b/8)`` bytes; the unused high bits of the last byte
are zero. For b=4 this is exactly ONNX FLOAT4E2M1 / torchao order (element 0
in the low nibble); for b=2 element 0 sits in bits 0-1.

Why this layout: any 8 consecutive elements occupy exactly ``b`` whole bytes,
so a GPU thread loads ``b`` bytes (one 64-bit little-endian word) and extracts
element ``i`` with ``(word >> (i*b)) & mask``: no straddling across groups.
Rows are packed independently, so a row starts on a byte boundary whenever
``L*b`` is a multiple of 8 (always when L is a multiple of 8).
See docs/formats.md for the diagram.
"""
from __future__ import annotations

import numpy as np

GROUP = 8  # elements per b-byte group


def packed_length(length: int, bits: int) -> int:
    """Bytes taken by ``length`` codes of ``bits`` bits."""
    _check_bits(bits)
    return (length * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def pack(codes: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """Pack integer ``codes`` (each < 2**bits) densely along ``axis`` -> uint8."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"pack expects integer codes, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(
            f"pack: codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing; "
            f"got [{codes.min()}, {codes.max()}]"
        )
    if codes.ndim == 0:
        raise ValueError("pack needs at least one dimension")
    moved = np.moveaxis(codes, axis, -1).astype(np.uint64)
    length = moved.shape[-1]
    groups = -(-length // GROUP)
    padded = np.zeros(moved.shape[:-1] + (groups * GROUP,), np.uint64)
    padded[..., :length] = moved
    shifts = (np.arange(GROUP, dtype=np.uint64) * np.uint64(bits))
    words = (padded.reshape(moved.shape[:-1] + (groups, GROUP)) << shifts).sum(-1, dtype=np.uint64)
    as_bytes = words.astype("<u8").view(np.uint8).reshape(moved.shape[:-1] + (groups, 8))
    stream = as_bytes[..., :bits].reshape(moved.shape[:-1] + (groups * bits,))
    out = np.ascontiguousarray(stream[..., : packed_length(length, bits)])
    return np.moveaxis(out, -1, axis)


def unpack(packed: np.ndarray, bits: int, length: int, axis: int = -1) -> np.ndarray:
    """Inverse of :func:`pack`: ``length`` uint8 codes per row along ``axis``."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype not in (np.uint8, np.int8):
        raise TypeError(f"unpack expects uint8 (or int8) bytes, got dtype {packed.dtype}")
    moved = np.moveaxis(packed.view(np.uint8), axis, -1)
    need = packed_length(length, bits)
    if moved.shape[-1] != need:
        raise ValueError(
            f"unpack: {length} codes of {bits} bits need {need} bytes along the axis, "
            f"got {moved.shape[-1]}"
        )
    groups = -(-length // GROUP)
    buf = np.zeros(moved.shape[:-1] + (groups, 8), np.uint8)
    flat = np.zeros(moved.shape[:-1] + (groups * bits,), np.uint8)
    flat[..., :need] = moved
    buf[..., :bits] = flat.reshape(moved.shape[:-1] + (groups, bits))
    words = buf.view("<u8")[..., 0]
    shifts = np.arange(GROUP, dtype=np.uint64) * np.uint64(bits)
    codes = (words[..., None] >> shifts) & np.uint64((1 << bits) - 1)
    codes = codes.reshape(moved.shape[:-1] + (groups * GROUP,))[..., :length].astype(np.uint8)
    return np.moveaxis(codes, -1, axis)
