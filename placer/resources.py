"""The memory this machine has, and the refusal of work that needs more (exit 2, both figures)."""

from __future__ import annotations

import os

from placer.display import format_value
from placer.errors import InvalidInputError


def memory_available() -> int | None:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo, else free pages), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    """``n`` bytes as e.g. ``8.000 TB`` (decimal units; :func:`placer.display.format_value`)."""
    return format_value("bytes", n)


def check_memory(source: str | os.PathLike[str], nbytes: float, what: str = "declares an array of") -> None:
    """Refuse, naming ``source``, work that needs ``nbytes`` when that exceeds the memory available."""
    avail = memory_available()
    if avail is not None and nbytes > avail:
        raise InvalidInputError(f"{what} {human_bytes(nbytes)}; {human_bytes(avail)} available",
                                source=str(source))
