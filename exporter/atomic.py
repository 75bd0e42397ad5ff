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
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
