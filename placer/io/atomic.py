"""Atomic file writes: write a temp file in the target's directory, fsync it, rename it over.

A reader never sees a half-written file: the target either keeps its old content or gets the
whole new one. Parent directories are never created; a missing one is an
:class:`~placer.errors.InvalidInputError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from placer.errors import InvalidInputError


def _target(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInputError(f"cannot write: directory {str(parent)!r} does not exist",
                                source=str(path))
    if target.is_dir():
        raise InvalidInputError("cannot write: the path is a directory", source=str(path))
    return target


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not possible on every platform, so best effort.
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temp path next to ``path``; on success it is fsynced and renamed onto ``path``.

    The caller writes the temp path however it likes (numpy, pyarrow, ...). On an exception
    the temp file is removed and the exception propagates; an ``OSError`` becomes an
    :class:`InvalidInputError` naming ``path``.
    """
    target = _target(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(directory))
    except OSError as exc:
        raise InvalidInputError(f"cannot write: {exc.strerror or exc}", source=str(path)) from None
    os.close(fd)
    try:
        try:
            # mkstemp creates 0600; give the file the target's mode, or a plain 0644.
            mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
            os.chmod(tmp, mode)
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, target)
        except OSError as exc:
            raise InvalidInputError(f"cannot write: {exc.strerror or exc}", source=str(path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
