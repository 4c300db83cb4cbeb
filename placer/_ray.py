"""The one way placer joins Ray: the local instance, or a cluster at an address that answers.

``ray.init(address="host:port")`` retries an unreachable cluster for minutes; :func:`init`
first checks that something listens there (a few seconds), so a wrong ``--ray-address`` is one
clear line, not a hang.
"""

from __future__ import annotations

import socket
from typing import Any

from placer.errors import InvalidInputError, MissingDependencyError

CONNECT_TIMEOUT_S = 5.0
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
"""Ray starts its workers at niceness 15 by default: beside any busy process they get a few
percent of a core (a layer search on Ray took minutes on a 2-core machine with two busy
processes). A local instance placer starts runs them at the caller's priority; a cluster's own
configuration is left alone."""


def import_ray(what: str) -> Any:
    try:
        import ray  # deferred: ray is an optional extra
    except ImportError:
        raise MissingDependencyError("ray", "runtime", what) from None
    return ray


def _reachable(address: str, timeout_s: float) -> bool:
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return True  # not host:port ("auto", a named address): Ray resolves it and fails fast
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def init(address: str | None, what: str, **kwargs: Any) -> Any:
    """``ray.init`` once per process (an initialised Ray is reused, the address then ignored).

    ``address`` None starts a local instance (workers at niceness 0, :data:`LOCAL_SYSTEM_CONFIG`). Raises InvalidInputError (source
    ``--ray-address``) when the cluster cannot be reached.
    """
    ray = import_ray(what)
    if ray.is_initialized():
        return ray
    if address is not None and not _reachable(address, CONNECT_TIMEOUT_S):
        raise InvalidInputError(f"no Ray cluster answers at {address}", source="--ray-address")
    if address is None:  # a local instance: its workers do this job, at the caller's priority
        kwargs = {**kwargs, "_system_config": {**LOCAL_SYSTEM_CONFIG, **kwargs.get("_system_config", {})}}
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise InvalidInputError(f"cannot join the Ray cluster at {address}: {exc}", source="--ray-address") from None
    return ray
