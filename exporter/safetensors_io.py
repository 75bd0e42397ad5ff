"""Streaming safetensors I/O with plain file reads and writes (no memory map).

safetensors' own loader memory-maps the file, so every tensor read leaves its
file pages mapped into the process: loading a 5 GB checkpoint into a 10 GB
float32 UNet shows 15 GB resident. Reading each tensor with ``readinto`` keeps
the process at the model plus one tensor; writing one tensor at a time avoids
a second copy of the model. The layout is the safetensors spec: u64
little-endian header size, JSON header (space padded), raw little-endian data.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


def read_header(f: BinaryIO) -> tuple[dict, int]:
    """(header without __metadata__, byte offset of the data section) of an open safetensors file."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("file too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > 100_000_000:
        raise ValueError(f"implausible safetensors header size {n}")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(f: BinaryIO, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor of an open file, read (not mapped) into fresh memory."""
    begin, end = entry["data_offsets"]
    dtype = DTYPES[entry["dtype"]]
    buf = bytearray(end - begin)
    f.seek(data_start + begin)
    if f.readinto(buf) != len(buf):
        raise ValueError("safetensors file is truncated")
    if not buf:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


def iter_tensors(path: str | Path, names=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for ``names`` (default: all, in file order), one at a time."""
    with open(path, "rb") as f:
        header, start = read_header(f)
        for name in (names if names is not None else sorted(header, key=lambda k: header[k]["data_offsets"])):
            yield name, read_tensor(f, header[name], start)


def tensor_names(path: str | Path) -> list[str]:
    with open(path, "rb") as f:
        return list(read_header(f)[0])


def write_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               storage_dtype: Callable[[torch.Tensor], torch.dtype] = lambda t: t.dtype) -> None:
    """Write ``tensors`` one at a time, each converted to ``storage_dtype(tensor)``; fsynced."""
    dtypes = {k: storage_dtype(v) for k, v in tensors.items()}
    header, offset = {"__metadata__": metadata or {}}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * torch.empty((), dtype=dtypes[k]).element_size()
        header[k] = {"dtype": NAMES[dtypes[k]], "shape": list(v.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, v in tensors.items():
            t = v.detach().to("cpu", dtypes[k]).contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
