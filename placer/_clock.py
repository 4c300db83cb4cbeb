"""When this process started, in ``time.time()`` seconds: the origin of the CLI's time limits.

``placer solve --time-limit T`` bounds the wall time from process start (interpreter start-up,
imports, reading inputs, numba compilation and worker start-up included), so the CLI measures
its deadline from :func:`process_start_time`, not from the solver call.
"""

from __future__ import annotations

import os
import time

_IMPORTED_AT = time.time()


def process_start_time() -> float:
    """The wall-clock start of this process (Linux ``/proc``); elsewhere when this module loaded."""
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as f:
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])  # since boot, clock ticks
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        started = time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED_AT
    # A clock that disagrees (e.g. another boot time inside a container): the import time.
    return started if _IMPORTED_AT - 60.0 <= started <= _IMPORTED_AT else _IMPORTED_AT
