"""Atomic artifact writes: a crash or Ctrl-C never leaves a half-written file a rerun would trust.

Everything is written to a temporary name in the destination folder and moved into place with
``os.replace`` (atomic on POSIX) only once complete. Stale temporaries from killed runs carry the
``.partial-`` marker and are never read; :func:`remove_stale_partials` sweeps them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

PARTIAL_MARK = ".partial-"


def check_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it is writable; raise PermissionError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=PARTIAL_MARK):
            pass
    except OSError as err:
        raise PermissionError(f"output folder {path} is not writable ({err.strerror or err}); "
                              "choose another with --out") from None
    return path


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest``, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{PARTIAL_MARK}{dest.name}.")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _new_file_mode())  # mkstemp makes it private (0600); artifacts are not
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | Path, text: str) -> None:
    atomic_write_bytes(dest, text.encode())


def atomic_write_json(dest: str | Path, obj) -> None:
    """Deterministic JSON (sorted keys, fixed indent, trailing newline)."""
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def remove_stale_partials(folder: str | Path) -> int:
    """Delete temporaries left by killed runs; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.rglob(f"{PARTIAL_MARK}*") if p.is_file()]
    for p in stale:
        p.unlink()
    return len(stale)


#: a protobuf holds at most 2 GiB; above this a model's weights go to one external data file
EXTERNAL_DATA_THRESHOLD = 2_000_000_000


@contextlib.contextmanager
def atomic_onnx(path: str | Path) -> Iterator[tuple[Path, str]]:
    """Yield (a temporary path for the .onnx, the data file's name ``<name>.data``).

    Write the .onnx (and, beside it, at most the one data file) there. On success both move into
    place, the .onnx last, so a reader never sees a model whose data file is missing or stale;
    a data file left at the destination by an earlier save is removed when none was written."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{PARTIAL_MARK}{path.name}."))
    try:
        yield tmp_dir / path.name, data_name
        data_dest = path.with_name(data_name)
        if (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, data_dest)
        elif data_dest.exists():
            data_dest.unlink()
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_onnx_atomic(model, path: str | Path, external_data: bool | None = None) -> Path | None:
    """Save an ``onnx.ModelProto`` (+ at most one ``<name>.data`` file) atomically (:func:`atomic_onnx`).

    Returns the data file's path when one was written. ``external_data=None``: only above 2 GB.
    With external data, onnx moves the weights out of ``model`` (it is left without them).
    """
    import onnx

    nbytes = sum(t.ByteSize() for t in model.graph.initializer)
    use_external = nbytes > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    with atomic_onnx(path) as (tmp, data_name):
        onnx.save_model(model, tmp, save_as_external_data=use_external,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
    return Path(path).with_name(data_name) if use_external else None
