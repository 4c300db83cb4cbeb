"""Shared helpers of the serving-stack conformance tests (tests/stacks/).

These tests run the RELEASED stacks (SGLang 0.5.23, vLLM 0.34.0) from the separate venv
``.venv-stacks`` (built by ``make .venv-stacks/.installed``, see tests/stacks/stacks.mk) through
probe scripts that print one JSON object. The helpers live in stacks_support.py
(``run_probe(script, *args) -> dict``, ``stacks_python_path()``) so test modules can import
them; they are re-exported here. The main venv never imports the stacks.

Without ``.venv-stacks`` the tests skip, unless the environment variable ``CI`` is set: then
they fail (CI builds the venv first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from stacks_support import (  # noqa: F401  (re-exported)
    PROBE_TIMEOUT_S,
    REPO,
    STACKS_DIR,
    STACKS_PYTHON,
    run_probe,
    stacks_python_path,
)


@pytest.fixture(scope="session")
def stacks_python() -> Path:
    """Path of ``.venv-stacks/bin/python``; skips when missing, fails when ``CI`` is set."""
    return stacks_python_path()
