"""The README's ``$ placer`` examples, run and compared with what the README shows (doc test).

Each fenced block that starts with ``$ placer`` is a session: its commands run in order in one
temporary directory, with ``placer`` on the PATH (this interpreter's environment), and each
command's output (stdout and stderr together) must match the lines the README shows after it,
durations, rates, temporary paths and solve-time columns masked (``tests/readme_doctest.py``).
Sessions that read the real Mixtral traces link them from ``../shared/data`` and skip with a
reason when it is absent. Blocks without a ``$`` prompt are listings, not run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from readme_doctest import MIXTRAL_DATA, ROOT, Session, mask, matches, sessions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SESSIONS = sessions((ROOT / "README.md").read_text(encoding="utf-8"))
STEPS = [(s, i) for s in SESSIONS for i in range(len(s.steps))]


def _run(session: Session, workdir: Path) -> list[tuple[list[str], list[str]]]:
    """(expected, printed) per step, both masked; stops at the first step that fails to run."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    if session.needs_data:
        for f in MIXTRAL_DATA.iterdir():
            (workdir / f.name).symlink_to(f)
    out = []
    for step in session.steps:
        done = subprocess.run(["bash", "-c", step.command], cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        out.append((mask(step.expected, str(workdir)), mask(done.stdout.splitlines(), str(workdir))))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every runnable session's steps, two sessions at a time (they are independent)."""
    runnable = [s for s in SESSIONS if not (s.needs_data and not MIXTRAL_DATA.is_dir())]
    dirs = [tmp_path_factory.mktemp(f"readme-{s.line}") for s in runnable]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(_run, runnable, dirs))
    return {s.line: r for s, r in zip(runnable, done, strict=True)}


def test_masking_and_elision_accept_only_what_they_should():
    assert mask(["solved in 0.44 s; wrote /tmp/x/p.json", "tok (21,923 tokens/s)  (a note)"], "/tmp/x") == \
        ["solved in <t>; wrote p.json", "tok <rate>"]
    table = ["method  solve s  load", "------  -------  ----", "eplb       0.01  1.25"]
    assert mask(table)[2] == "eplb <t> 1.25"
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])[0]
    assert matches(["a", "..."], ["a"])[0]
    assert not matches(["a", "...", "d"], ["a", "b", "c"])[0]
    assert not matches(["eplb <t> 1.25"], ["eplb <t> 1.26"])[0]
    assert not matches(["a"], ["a", "b"])[0]  # an extra printed line fails


def test_the_readme_has_sessions_to_run():
    assert len(SESSIONS) >= 4 and sum(len(s.steps) for s in SESSIONS) >= 15
    assert any(s.steps[0].command.startswith("placer demo") for s in SESSIONS)


@pytest.mark.parametrize(("session", "index"), STEPS,
                         ids=[f"L{s.line}-{i}-{s.steps[i].command.split()[1]}" for s, i in STEPS])
def test_readme_example(results, session, index):
    if session.needs_data and not MIXTRAL_DATA.is_dir():
        pytest.skip(f"needs the real Mixtral traces in {MIXTRAL_DATA}")
    expected, printed = results[session.line][index]
    ok, why = matches(expected, printed)
    shown = "\n".join(printed[:40])
    assert ok, f"README line {session.line}, `{session.steps[index].command}`: {why}\nprinted (masked):\n{shown}"
