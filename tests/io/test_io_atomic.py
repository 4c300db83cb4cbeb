"""Atomic writes: temp file, fsync, rename; no leftovers; missing parent is an input error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from placer.errors import InvalidInputError
from placer.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text


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


def test_import_does_not_import_torch():
    code = "import sys, placer, placer.io; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
