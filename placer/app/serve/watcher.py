"""Directory polling: routing files that land in a directory become observations.

Every regular file directly in the directory is a candidate (names starting with ``.`` and
``*.tmp`` / ``*.part`` temp files are ignored). A file is read once its (mtime, size) has been
the same on two consecutive scans, so a file still being written is not read half-way; it is
read again whenever it changes later. Any supported routing input works
(:func:`placer.io.traces.read_input`): SGLang ``stat`` / ``per_pass`` / ``per_token`` dumps,
placer stats ``.npz``, load matrices, traces. A file that cannot be read is reported as bad
(logged and counted by the service) and not retried until it changes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from placer.app.serve.state import Observation, observation_from_stats
from placer.errors import PlacerError
from placer.io.routing import top1_reason
from placer.io.traces import read_input
from placer.stats import compute_stats
from placer.types import ModelSpec

log = logging.getLogger("placer.serve")
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".swp")


def read_observation(path: str, model: ModelSpec) -> Observation:
    """One routing file as an observation (raises PlacerError for bad input)."""
    inp = read_input(path, model=model)
    if inp.kind == "stats":
        assert inp.stats is not None
        return observation_from_stats(inp.stats, path)
    assert inp.chunks is not None
    stats = compute_stats(inp.chunks(), sample_size=0)
    if not stats.has_top1 and stats.num_layers > 1:
        log.warning("%s: %s; the window's top-1 transitions come from other inputs only", path,
                    top1_reason(inp.format, "trace"))
    return observation_from_stats(stats, path)


@dataclass
class ScanResult:
    observations: list[Observation]
    bad: list[tuple[str, str]]


class DirectoryWatcher:
    """Poll ``directory``; ``seen`` (name -> [mtime_ns, size]) is shared with the state file."""

    def __init__(self, directory: str, model: ModelSpec, seen: dict[str, list[int]],
                 reader: Callable[[str, ModelSpec], Observation] = read_observation):
        self.directory = directory
        self.model = model
        self.seen = seen
        self.reader = reader
        self._pending: dict[str, list[int]] = {}

    def _listing(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        with os.scandir(self.directory) as it:
            for entry in it:
                name = entry.name
                if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
                    continue
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except OSError:
                    continue  # removed while scanning
                out[name] = [int(st.st_mtime_ns), int(st.st_size)]
        return out

    def scan(self) -> ScanResult:
        """Read the files that settled since the last scan."""
        result = ScanResult([], [])
        listing = self._listing()
        for name in list(self.seen):
            if name not in listing:
                del self.seen[name]
        for name in list(self._pending):
            if name not in listing:
                del self._pending[name]
        for name in sorted(listing):
            sig = listing[name]
            if self.seen.get(name) == sig:
                continue
            if self._pending.get(name) != sig:
                self._pending[name] = sig
                continue
            del self._pending[name]
            self.seen[name] = sig
            path = os.path.join(self.directory, name)
            try:
                result.observations.append(self.reader(path, self.model))
            except PlacerError as exc:
                result.bad.append((path, " ".join(str(exc).split())))
            except Exception as exc:  # noqa: BLE001 - a reader bug or odd file must not stop the service
                log.warning("unexpected error reading %s", path, exc_info=True)
                result.bad.append((path, f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}"))
        return result
