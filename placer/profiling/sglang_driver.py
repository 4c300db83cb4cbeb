"""Profile a running SGLang server through its expert-distribution recorder.

The server must run with ``--expert-distribution-recorder-mode stat|per_pass|per_token``. The
driver POSTs ``/start_expert_distribution_record``, waits ``duration`` seconds while the server
serves whatever traffic it gets, POSTs ``/stop_expert_distribution_record`` and
``/dump_expert_distribution_record``. The dump is written server-side into
``$SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` (default ``/tmp``), so ``dump_dir`` must be that
directory, on this machine or a shared volume. The files the dump created
(``expert_distribution_recorder_*.pt``: one for ``stat``, one per rank for ``per_pass`` and
``per_token``) are then read with :func:`placer.io.routing.gather_routing`, which merges the ranks.

Only the standard library talks HTTP; the ``.pt`` files need torch (``weights_only=True``).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from placer.errors import InvalidInputError
from placer.io.routing import gather_routing
from placer.types import ModelSpec

ENDPOINTS = ("start_expert_distribution_record", "stop_expert_distribution_record",
             "dump_expert_distribution_record")
DUMP_GLOB = "expert_distribution_recorder_*.pt"


def call(url: str, endpoint: str, *, timeout_s: float = 60.0) -> str:
    """POST ``url/endpoint`` with an empty body; the response text. Errors name the URL."""
    target = f"{url.rstrip('/')}/{endpoint}"
    request = urllib.request.Request(target, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", errors="replace").strip().splitlines()
        detail = f": {body[0][:200]}" if body else ""
        raise InvalidInputError(f"HTTP {exc.code} from /{endpoint}{detail} (is the server running with "
                                "--expert-distribution-recorder-mode?)", source=url) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InvalidInputError(f"cannot reach the server for /{endpoint}: {reason}", source=url) from None


def _snapshot(directory: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in directory.glob(DUMP_GLOB) if p.is_file()}


def new_dump_files(directory: Path, before: dict[str, float], *, wait_s: float = 10.0,
                   poll_s: float = 0.1) -> list[Path]:
    """Dump files in ``directory`` that are new or rewritten since ``before``, once their count
    and sizes have been stable for one poll (rank files may land one after another); waits up to
    ``wait_s`` for the first."""
    deadline = time.monotonic() + wait_s
    last: list[tuple[str, int]] | None = None
    while True:
        now = _snapshot(directory)
        fresh = sorted(name for name, mtime in now.items() if before.get(name) != mtime)
        sizes = [(n, (directory / n).stat().st_size) for n in fresh]
        if fresh and sizes == last:
            return [directory / n for n in fresh]
        last = sizes
        if time.monotonic() > deadline:
            if fresh:
                return [directory / n for n in fresh]
            raise InvalidInputError(f"no new {DUMP_GLOB} appeared after the dump; --dump-dir must be the "
                                    "server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR (default /tmp)",
                                    source=str(directory))
        time.sleep(poll_s)


def record(url: str, duration_s: float, dump_dir: str | os.PathLike[str], *,
           progress: Callable[[str], None] | None = None, wait_s: float = 10.0) -> list[Path]:
    """Drive one recording window on the server at ``url``; the dump files it wrote."""
    say = progress or (lambda message: None)
    directory = Path(dump_dir)
    if not directory.is_dir():
        raise InvalidInputError("dump directory does not exist", source=str(dump_dir))
    if not duration_s >= 0:
        raise InvalidInputError(f"duration must be >= 0 seconds, got {duration_s}", source="--duration")
    before = _snapshot(directory)
    call(url, ENDPOINTS[0])
    say(f"recording expert distribution on {url} for {duration_s:g} s")
    try:
        end = time.monotonic() + duration_s
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))
    finally:
        call(url, ENDPOINTS[1])
    call(url, ENDPOINTS[2])
    files = new_dump_files(directory, before, wait_s=wait_s)
    say(f"dump: {', '.join(p.name for p in files)}")
    return files


def profile_sglang(url: str, duration_s: float, dump_dir: str | os.PathLike[str], *,
                   model: ModelSpec | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None, wait_s: float = 10.0):
    """Record a window on the server and read its dump: a :class:`placer.io.routing.Routing`."""
    files = record(url, duration_s, dump_dir, progress=progress, wait_s=wait_s)
    return gather_routing([str(p) for p in files], model=model, seed=seed, keep_trace=False)
