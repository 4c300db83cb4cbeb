"""The README's examples as a doc test: parse its ``$ placer ...`` sessions, run them, compare.

A session is a fenced block whose lines start with ``$ ``: each command (continued by a trailing
backslash) runs in ``bash`` in one working directory per block, in order, and its output
(stdout and stderr, as a terminal shows them) is compared with the lines that follow it, up to
the next command. In the expected text a line ``...`` stands for any number of lines, and text
after two spaces and ``(`` at the end of a line is a note to the reader, not output. Before
comparing, both sides are masked (:func:`mask`): durations, rates, temporary paths, and the
columns of tables headed ``solve s`` / ``solve_s``. Progress lines (stderr, piped: one every few
seconds of a long run, :mod:`placer.cli.progress`) are dropped: a terminal shows a bar there
that clears when the command ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MIXTRAL_DATA = DATA / "hdmoe-mixtral-mtbench"


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)


@dataclass
class Session:
    line: int  # 1-based line of the block's first command in README.md
    steps: list[Step]

    @property
    def needs_data(self) -> bool:
        return any("_mixtral.json" in s.command for s in self.steps)


def sessions(text: str) -> list[Session]:
    """The README's ``$ placer`` sessions, in order."""
    out: list[Session] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        j = i + 1
        block: list[tuple[int, str]] = []
        while j < len(lines) and not lines[j].startswith("```"):
            block.append((j + 1, lines[j]))
            j += 1
        i = j + 1
        if not block or not block[0][1].startswith("$ placer"):
            continue
        steps: list[Step] = []
        k = 0
        while k < len(block):
            number, line = block[k]
            if line.startswith("$ "):
                command = line[2:]
                while command.endswith("\\") and k + 1 < len(block):
                    k += 1
                    command = command[:-1].rstrip() + " " + block[k][1].strip()
                steps.append(Step(command))
            elif steps:
                steps[-1].expected.append(line)
            k += 1
        out.append(Session(block[0][0], steps))
    return out


_NOTE = re.compile(r"\s{2,}\([^()]*\)\s*$")
_DURATION = re.compile(r"\b\d+(\.\d+)?( ?(s|ms|us|min))\b")
_PROGRESS = re.compile(r"^placer [a-z][a-z -]*: .*\b\d+ s elapsed(, about \d+ s left)?$")
_RATE = re.compile(r"\(?[\d,]+(\.\d+)? (tokens/s|tok/s)\)?")


def _mask_columns(lines: list[str]) -> list[str]:
    """Blank the ``solve s`` / ``solve_s`` column of whitespace-aligned tables."""
    out, span = [], None
    for line in lines:
        m = re.search(r"\bsolve[ _]s\b", line)
        if m:
            span = (m.start(), m.end())
            out.append(line)
            continue
        if span and line.strip() and not set(line.strip()) <= {"-", " "}:
            tokens = list(re.finditer(r"\S+", line))
            hit = [t for t in tokens if t.start() < span[1] + 2 and t.end() > span[0] - 2]
            if hit and re.fullmatch(r"[\d.]+", hit[-1].group()):
                t = hit[-1]
                line = line[:t.start()] + "<t>".rjust(t.end() - t.start()) + line[t.end():]
        elif not line.strip():
            span = None
        out.append(line)
    return out


def mask(lines: list[str], workdir: str | None = None) -> list[str]:
    """Durations, rates, the working directory and solve-time columns masked; trailing space,
    readers' notes and progress lines dropped."""
    out = []
    for line in _mask_columns([x for x in lines if not _PROGRESS.match(x)]):
        if workdir:
            line = line.replace(workdir + "/", "").replace(workdir, ".")
        line = _NOTE.sub("", line)
        line = _RATE.sub("<rate>", line)
        line = _DURATION.sub("<t>", line)
        out.append(" ".join(line.split()))
    while out and not out[-1]:
        out.pop()
    return out


def matches(expected: list[str], got: list[str]) -> tuple[bool, str]:
    """Whether ``got`` matches ``expected`` (``...`` for any lines); a reason when not."""
    exp = [e for e in expected]

    def walk(a: int, b: int) -> bool:
        while a < len(exp):
            if exp[a] == "...":
                if a + 1 == len(exp):
                    return True
                return any(walk(a + 1, k) for k in range(b, len(got) + 1))
            if b >= len(got) or exp[a] != got[b]:
                return False
            a, b = a + 1, b + 1
        return b == len(got)

    if walk(0, 0):
        return True, ""
    diff = next((f"expected {e!r}, got {g!r}" for e, g in zip(exp, got, strict=False)
                 if e != g and e != "..."), f"{len(exp)} expected lines, {len(got)} printed")
    return False, diff
