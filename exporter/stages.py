"""Stage cache: each pipeline stage's result is kept under a content hash of its inputs and options.

A stage record ``OUT/.stages/<stage>.json`` is written (atomically) only after all the stage's
outputs are complete, and names the key it was made for and each output's size and mtime. A rerun
skips the stage when the key matches and every output is still as recorded; a changed option
changes that stage's key and, through the chain of keys, every stage after it, and nothing before.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_write_json

STAGE_DIR = ".stages"


def stage_key(*parts) -> str:
    """Stable hash of JSON-able parts (options, upstream keys, file fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def file_fingerprint(path: str | Path) -> dict:
    """Identity of an input file without reading it all: path, size, mtime."""
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class StageResult:
    name: str
    key: str
    outputs: dict  # relative path -> {"size", "mtime_ns"}
    seconds: float
    cached: bool


class StageCache:
    def __init__(self, out_dir: str | Path, force: bool = False):
        self.out = Path(out_dir)
        self.force = force

    def _record_path(self, name: str) -> Path:
        return self.out / STAGE_DIR / f"{name}.json"

    def _stat(self, rel: str) -> dict:
        st = (self.out / rel).stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def lookup(self, name: str, key: str) -> dict | None:
        """The stage record if it is for ``key`` and every output is still as recorded."""
        path = self._record_path(name)
        if self.force or not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if rec.get("key") != key:
            return None
        for rel, stat in rec.get("outputs", {}).items():
            if not (self.out / rel).is_file() or self._stat(rel) != stat:
                return None
        return rec

    def run(self, name: str, key: str, produce: Callable[[], list[str]], meta: dict | None = None) -> StageResult:
        """Run ``produce`` (returns the relative paths it wrote) unless a valid record exists."""
        rec = self.lookup(name, key)
        if rec is not None:
            return StageResult(name, key, rec["outputs"], 0.0, True)
        # The old record stays: if ``produce`` fails before touching an output, the export is
        # unchanged and still valid; any output it rewrote no longer matches the recorded
        # size/mtime, so the old record stops being trusted by itself.
        start = time.perf_counter()
        rels = produce()
        outputs = {rel: self._stat(rel) for rel in rels}
        seconds = time.perf_counter() - start
        atomic_write_json(self._record_path(name), {"key": key, "outputs": outputs,
                                                    "seconds": round(seconds, 3), **(meta or {})})
        return StageResult(name, key, outputs, seconds, False)


def run_in_child(fn: Callable, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh Python process; its result or exception comes back.

    A long-lived process keeps the heap it once needed (freed memory mostly stays with it), so
    when a 2.6 B-parameter UNet's quantization, export, passes and TensorRT build run one after
    another in one process, their peaks add up. In a child each stage's memory returns to the
    system when it ends: the job's peak is the largest stage's, not the sum."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args, **kwargs).result()
