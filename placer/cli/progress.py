"""The one progress display of every long-running command, on stderr.

On a terminal it is a tqdm bar with an ETA (cleared when the work ends); when stderr is piped
it is a plain line at most every :data:`INTERVAL_S` seconds, the first after that long, so short
runs print nothing; with ``--quiet`` nothing. The library reports progress through callbacks
(``progress=``); commands turn those into :meth:`Progress.update` calls, and the display is
drawn from those calls, in the caller's thread. Only a command that waits without callbacks and
starts no worker processes asks for a clock thread (``ticker=True``): a live thread makes the
layer search's process pool use ``forkserver`` instead of ``fork`` (:mod:`placer.ilp.parallel`),
so the bar runs none of its own either (tqdm's monitor thread is off). stdout is never touched.

A piped line reads::

    placer simulate run: eplb, 412/1,000 steps (41%), 10 s elapsed, about 14 s left
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import Any, TextIO

import click

from placer._progress import TOKENS_READ, TOKENS_SCORED

INTERVAL_S = 5.0  # seconds between piped lines (and before the first)
REFRESH_S = 0.5  # seconds between redraws of a terminal bar


class Progress:
    """Progress of one command: ``done`` of ``total`` ``unit`` (total None: unknown) and a note.

    Use as a context manager; :meth:`update` is cheap and thread-safe, so callbacks may call it
    as often as they like. With ``clock=True``, ``done`` is the seconds since ``start`` (against
    a time limit ``total``). With ``ticker=True`` a clock thread redraws while the work runs
    without callbacks.
    """

    def __init__(self, command: str, *, total: float | None = None, unit: str = "", quiet: bool = False,
                 clock: bool = False, ticker: bool = False, start: float | None = None,
                 stream: TextIO | None = None, interval_s: float | None = None):
        self.command, self.total, self.unit, self.clock, self.ticker = command, total, unit, clock, ticker
        self.stream = sys.stderr if stream is None else stream
        self.enabled = not quiet
        self.terminal = self.enabled and _isatty(self.stream)
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.start = time.time() if start is None else start  # wall clock: --time-limit counts from process start
        self.done = 0.0
        self.note = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._last_line = time.monotonic()

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        if self.terminal:
            from tqdm import tqdm  # deferred: keeps placer --help fast

            tqdm.monitor_interval = 0  # no monitor thread (see the module docstring)
            self._bar = tqdm(total=_whole(self.total), unit=f" {self.unit}" if self.unit else "it",
                             desc=f"placer {self.command}", file=self.stream, leave=False, dynamic_ncols=True,
                             mininterval=REFRESH_S, bar_format=self._format())
        if self.ticker:
            self._thread = threading.Thread(target=self._tick, name="placer-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, done: float | None = None, *, total: float | None = None, note: str | None = None,
               advance: float | None = None) -> None:
        """Set ``done`` (or add ``advance``), the ``total`` and the ``note`` (any left None stays)."""
        if not self.enabled:
            return
        with self._lock:
            if total is not None:
                self.total = total
            if done is not None:
                self.done = done
            if advance is not None:
                self.done += advance
            if note is not None:
                self.note = note
            self._show()

    def report(self, what: str, done: int, total: int) -> None:
        """A sink for the library's reports (:func:`placer._progress.reporting`): tokens read or
        scored are this display's count when it counts tokens; anything else is its note."""
        if what in (TOKENS_READ, TOKENS_SCORED) and self.unit == "tokens" and not self.clock:
            self.update(done, total=total or None, note=what)
        else:
            self.update(note=f"{what} {done:,}" + (f"/{total:,}" if total else "")
                        + (" layers" if what == "layer search" else " tokens"))

    def close(self) -> None:
        """Stop the clock and clear the bar (piped: nothing more is printed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    # -- drawing -------------------------------------------------------------------------------

    def _tick(self) -> None:
        while not self._stop.wait(max(0.01, REFRESH_S if self.terminal else min(self.interval_s, 1.0))):
            with self._lock:
                self._show(force=True)

    def _show(self, force: bool = False) -> None:
        """Redraw the bar, or print the piped line when the interval has passed (lock held)."""
        if self._stop.is_set():
            return
        if self.clock:
            self.done = time.time() - self.start
        if self._bar is not None:
            self._draw(force)
        elif not self.terminal and time.monotonic() - self._last_line >= self.interval_s:
            self._last_line = time.monotonic()
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        bar = self._bar
        if self.total is not None and bar.total != self.total:
            bar.total = _whole(self.total)
            bar.bar_format = self._format()
        done = min(self.done, self.total) if self.total else self.done
        bar.n = int(done) if self.clock else _whole(round(done, 1))
        bar.set_postfix_str(self.note, refresh=False)
        if force:
            bar.refresh()
        else:
            bar.update(0)  # redraws at most every mininterval

    def _format(self) -> str | None:
        """The bar's layout: tqdm's own (with its ETA) for a count; a time-limited clock as a bar
        against the limit; without a total the count (or time) and the note."""
        if self.clock:
            return ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} s limit [{elapsed}<{remaining}]{postfix}"
                    if self.total else "{desc}: [{elapsed}]{postfix}")
        return None if self.total else "{desc}: {n_fmt}{unit} [{elapsed}]{postfix}"

    def line(self) -> str:
        """The piped line: note, done/total unit (percent), elapsed, about how long is left."""
        elapsed = time.time() - self.start
        parts = [self.note] if self.note else []
        if self.clock:
            count = f"{_fmt(self.total)} s limit" if self.total else ""
        elif self.total:
            count = f"{_fmt(self.done)}/{_fmt(self.total)} {self.unit}".rstrip()
            count += f" ({min(self.done / self.total, 1.0):.0%})"
        else:
            count = f"{_fmt(self.done)} {self.unit}".rstrip() if self.done else ""
        if count:
            parts.append(count)
        head = ", ".join(parts)
        text = f"placer {self.command}: " + (f"{head}, " if head else "") + f"{elapsed:.0f} s elapsed"
        left = self.seconds_left(elapsed)
        if left is not None:
            text += f", about {left:.0f} s left"
        return text

    def seconds_left(self, elapsed: float) -> float | None:
        """Remaining seconds at the rate so far (None when unknown)."""
        if not self.total:
            return None
        if self.clock:
            return max(self.total - elapsed, 0.0)
        if self.done <= 0:
            return None
        return max(elapsed * (self.total - self.done) / self.done, 0.0)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _whole(x: float | None) -> float | None:
    """``x`` as an int when it is whole (tqdm prints 10, not 10.0)."""
    return int(x) if x is not None and float(x).is_integer() else x


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if math.isclose(x, round(x)) or x >= 100 else f"{x:,.1f}"


def quiet_option(func):
    """``--quiet``: no progress display (stdout is the same with or without it)."""
    return click.option("--quiet", is_flag=True,
                        help="No progress display on stderr (a bar on a terminal, a line every few seconds "
                             "when piped); the output is the same.")(func)
