"""Helpers of the serving-stack conformance tests, importable from test modules
(``from stacks_support import run_probe``; a test module cannot import another directory's
``conftest``). tests/stacks/conftest.py re-exports them and adds the ``stacks_python`` fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STACKS_DIR = Path(__file__).resolve().parent
STACKS_PYTHON = REPO / ".venv-stacks" / "bin" / "python"
PROBE_TIMEOUT_S = 300


def stacks_python_path() -> Path:
    """The stacks venv's python; skips (or fails when ``CI`` is set) if it is missing."""
    if STACKS_PYTHON.exists():
        return STACKS_PYTHON
    reason = (f"{STACKS_PYTHON} is missing: build it with "
              "`make .venv-stacks/.installed` (tests/stacks/stacks.mk)")
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason)


def run_probe(script: str | os.PathLike[str], *args: str | os.PathLike[str],
              timeout: float = PROBE_TIMEOUT_S) -> dict:
    """Run ``.venv-stacks/bin/python SCRIPT ARGS...`` and parse the JSON object it prints.

    ``script`` is a path, or a file name under tests/stacks/. Fails the test (with the
    probe's stderr tail) on a non-zero exit status, a timeout or output that is not JSON.
    """
    python = stacks_python_path()
    script = Path(script)
    if not script.is_absolute() and not script.exists():
        script = STACKS_DIR / script
    cmd = [str(python), str(script), *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"probe timed out after {timeout:.0f} s: {' '.join(cmd)}\n"
                    f"{(exc.stderr or b'')[-4000:]!r}", pytrace=False)
    tail = proc.stderr[-4000:]
    if proc.returncode != 0:
        pytest.fail(f"probe exited {proc.returncode}: {' '.join(cmd)}\nstdout: {proc.stdout[-2000:]}\n"
                    f"stderr: {tail}", pytrace=False)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"probe printed no JSON: {' '.join(cmd)}\nstdout: {proc.stdout[-2000:]}\n"
                    f"stderr: {tail}", pytrace=False)


