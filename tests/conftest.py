"""Shared test configuration: bounded hypothesis profiles, markers, small fixtures."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def no_piped_progress_lines(monkeypatch):
    """Commands run in-process print no piped progress line (one every 5 s of a run): on a busy
    machine a slow run would add one to the stderr that tests expect to hold one error line.
    Tests of the progress display set ``INTERVAL_S`` themselves."""
    from placer.cli import progress

    monkeypatch.setattr(progress, "INTERVAL_S", 1e9)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs, no dashboard) for the whole test session.

    Tests using it carry ``@pytest.mark.ray``; they are skipped when ray is not installed.
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        from placer._ray import (
            LOCAL_SYSTEM_CONFIG,  # workers at the tests' priority, as placer starts them
        )

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _system_config=LOCAL_SYSTEM_CONFIG)
    yield ray
    if started:
        ray.shutdown()
