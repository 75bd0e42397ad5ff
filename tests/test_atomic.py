"""Atomic writes: the destination is either the old file or the complete new one, never partial."""
import os

import pytest

from exporter.atomic import (PARTIAL_MARK, atomic_path, atomic_write_bytes, atomic_write_json,
                             check_writable_dir, remove_stale_partials)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert dest.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_successful_write_replaces_and_json_is_deterministic(tmp_path):
    dest = tmp_path / "m.json"
    atomic_write_json(dest, {"b": 1, "a": [1, 2]})
    first = dest.read_bytes()
    atomic_write_json(dest, {"a": [1, 2], "b": 1})
    assert dest.read_bytes() == first and first.endswith(b"\n")


def test_stale_partials_are_swept(tmp_path):
    (tmp_path / f"{PARTIAL_MARK}x.onnx.123").write_bytes(b"junk")
    (tmp_path / "keep.onnx").write_bytes(b"ok")
    assert remove_stale_partials(tmp_path) == 1
    assert os.listdir(tmp_path) == ["keep.onnx"]


def test_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(PermissionError, match="not writable"):
        check_writable_dir(blocker / "sub")


def test_written_files_get_the_mode_a_plain_open_would_give(tmp_path):
    """mkstemp's temporaries are private (0600); a manifest or engine must not stay that way."""
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    atomic_write_bytes(tmp_path / "engine", b"x")
    assert (tmp_path / "engine").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
