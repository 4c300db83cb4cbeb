"""Atomic file writes: write a temp file in the target's directory, fsync it, rename it over.

A reader never sees a half-written file: the target either keeps its old content or gets the
whole new one. Parent directories are never created; a missing one is an
:class:`~placer.errors.InvalidInputError` naming the path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from placer.errors import InvalidInputError


def _target(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        what = f"{str(parent)!r} is not a directory" if parent.exists() else \
            f"directory {str(parent)!r} does not exist"
        raise InvalidInputError(f"cannot write: {what}", source=str(path))
    if target.is_dir():
        raise InvalidInputError("cannot write: the path is a directory", source=str(path))
    return target


def check_writable(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Refuse, before any work is done, an output that cannot be written (exit 2 naming ``path``).

    A file needs an existing, writable parent directory and must not be a directory. A
    ``directory`` output (created with its parents when missing) must not be a file, and its
    nearest existing ancestor must be a writable directory.
    """
    if not directory:
        target = _target(path)
        parent = target.parent if str(target.parent) else Path(".")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InvalidInputError(f"cannot write: permission denied in directory {str(parent)!r}",
                                    source=str(path))
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InvalidInputError("cannot write: the path exists and is not a directory", source=str(path))
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidInputError(f"cannot write: {str(ancestor)!r} is not a directory", source=str(path))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write: permission denied in directory {str(ancestor)!r}",
                                source=str(path))


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


@contextlib.contextmanager
def output_directory(path: str | os.PathLike[str]) -> Iterator[str]:
    """A results directory that holds a whole run's output or nothing from it.

    Checked with :func:`check_writable` first, then created with its parents; yields ``path``.
    When the body raises
    (a bad input found late, Ctrl-C, SIGTERM's ``SystemExit``), whatever the run added is
    removed: the directory and any parents it created when they did not exist, else the entries
    that were not there before (entries it replaced keep their new content). Every file inside
    is written atomically, so no file is ever half written.
    """
    check_writable(path, directory=True)
    target = Path(path)
    created = []  # the directories this run creates, outermost last
    probe = target
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    before = set() if created else {entry.name for entry in target.iterdir()}
    try:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInputError(f"cannot write: {exc.strerror or exc}", source=str(path)) from None
        yield str(path)
    except BaseException:
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        elif target.is_dir():
            for entry in target.iterdir():
                if entry.name not in before:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        with contextlib.suppress(OSError):
                            entry.unlink()
        raise
