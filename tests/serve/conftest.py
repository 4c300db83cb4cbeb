"""An in-process service on a free localhost port, driven over real HTTP."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from serve_helpers import MODEL, TOPOLOGY, Client

from placer.app.serve import PolicyConfig, ServeConfig, Service


@pytest.fixture
def start_service(tmp_path) -> Iterator[Callable[..., tuple[Service, Client]]]:
    started: list[Service] = []

    def start(token: str | None = None, **overrides) -> tuple[Service, Client]:
        policy = overrides.pop("policy", PolicyConfig(threshold=0.05, seed=0))
        kwargs = dict(model=MODEL, topology=TOPOLOGY, policy=policy, half_life=4.0, interval_s=0.05,
                      host="127.0.0.1", port=0, token=token)
        kwargs.update(overrides)
        service = Service(ServeConfig(**kwargs))
        host, port = service.start()
        started.append(service)
        return service, Client(f"http://{host}:{port}", token)

    yield start
    for s in started:
        s.stop()
