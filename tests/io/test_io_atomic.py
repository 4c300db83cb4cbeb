"""Atomic writes: temp file, fsync, rename; no leftovers; missing parent is an input error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from placer.errors import InvalidInputError
from placer.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text, output_directory


def test_write_and_overwrite(tmp_path):
    p = tmp_path / "a.bin"
    atomic_write_bytes(p, b"one")
    assert p.read_bytes() == b"one"
    atomic_write_text(p, "twö")
    assert p.read_text(encoding="utf-8") == "twö"
    assert os.listdir(tmp_path) == ["a.bin"]
    assert (p.stat().st_mode & 0o777) == 0o644


def test_failure_keeps_old_content_and_cleans_up(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_temp_is_in_same_directory(tmp_path):
    p = tmp_path / "x.json"
    with atomic_path(p) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as f:
            f.write("{}")
    assert p.read_text() == "{}"


def test_missing_parent_is_an_input_error(tmp_path):
    p = tmp_path / "nope" / "a.txt"
    with pytest.raises(InvalidInputError, match="does not exist") as exc:
        atomic_write_text(p, "x")
    assert str(p) in str(exc.value)
    assert not (tmp_path / "nope").exists()


def test_directory_target_is_an_input_error(tmp_path):
    with pytest.raises(InvalidInputError, match="directory") as exc:
        atomic_write_text(tmp_path, "x")
    assert str(tmp_path) in str(exc.value)


def test_output_directory_leaves_nothing_on_failure(tmp_path):
    """A failed run removes the directories it created (parents included) or the entries it added."""
    new = tmp_path / "a" / "b"
    with pytest.raises(KeyboardInterrupt), output_directory(new) as out:
        os.makedirs(os.path.join(out, "point"))
        atomic_write_text(os.path.join(out, "point", "m.json"), "{}")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []

    old = tmp_path / "old"
    old.mkdir()
    atomic_write_text(old / "keep.txt", "kept")
    with pytest.raises(SystemExit), output_directory(old) as out:
        atomic_write_text(os.path.join(out, "keep.txt"), "replaced")
        os.makedirs(os.path.join(out, "run", "deep"))
        atomic_write_text(os.path.join(out, "new.csv"), "x")
        raise SystemExit(143)
    assert sorted(os.listdir(old)) == ["keep.txt"] and (old / "keep.txt").read_text() == "replaced"

    with output_directory(tmp_path / "ok") as out:  # success keeps everything
        atomic_write_text(os.path.join(out, "r.csv"), "y")
    assert os.listdir(tmp_path / "ok") == ["r.csv"]
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInputError, match="not a directory"), output_directory(tmp_path / "file"):
        pass


def test_import_does_not_import_torch():
    code = "import sys, placer, placer.io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
