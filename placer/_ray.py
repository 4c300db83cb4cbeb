"""The one way placer joins Ray: a local instance of its own, or a cluster at an address.

Without an address (``None``, and no ``RAY_ADDRESS`` in the environment) :func:`init` starts a
new local instance: ``ray.init(address="local")``, which reads neither ``RAY_ADDRESS`` nor the
address file ``ray start`` leaves in Ray's temp folder (``/tmp/ray/ray_current_cluster``; under
``$RAY_TMPDIR`` when set). Plain ``ray.init()`` connects to the address in that file, and when
that cluster died without ``ray stop`` it retries for minutes, deaf to SIGTERM.

With an address (``--ray-address``, else ``RAY_ADDRESS``) it joins that cluster the way Ray
documents it, and turns each way joining fails into one line that names the cause and what to
set, in seconds (Ray's own waits are 20 s to many minutes, mostly inside C++ calls):

- unreachable: nothing accepts a connection there (:data:`CONNECT_TIMEOUT_S`), or what does is no
  Ray GCS (one GCS client, :data:`PROBE_TIMEOUT_S`, in a thread: signals still stop the wait);
- this machine runs no Ray node (a driver joins through a raylet on its own machine);
- token authentication (Ray 2.60): ``ray start`` turns it on when a token exists
  (``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token``, which any
  local ``ray.init()`` writes), but a driver given an explicit address stays out of token mode
  (``ray.init`` enables it only for ``address="auto"`` or none) and is refused. Where
  ``RAY_AUTH_MODE`` is unset and a token is available, this process runs in token mode
  (``RAY_AUTH_MODE=token``, as Ray's docs set it; a cluster without authentication ignores the
  token); an explicit ``RAY_AUTH_MODE`` is left alone. A missing or refused token is one line;
- another Ray or Python version than the cluster's (Ray's check when the driver connects).

``ray.init`` installs its own SIGTERM handler (``sys.exit(15)``); a handler the caller had set
(placer's CLI turns SIGTERM into an exception) comes back after it, and a SIGTERM during
``ray.init`` goes to it. A ``ray.init`` that is interrupted or fails stops the processes it had
started (an interrupted local start otherwise leaves the raylet's agents running).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Any

from placer.errors import InvalidInputError, MissingDependencyError

CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 15.0
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
"""Ray starts its workers at niceness 15 by default: beside any busy process they get a few
percent of a core (a layer search on Ray took minutes on a 2-core machine with two busy
processes). A local instance placer starts runs them at the caller's priority; a cluster's own
configuration is left alone."""

ADDRESS_ENV = "RAY_ADDRESS"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = os.path.join("~", ".ray", "auth_token")

_TOKEN_HELP = (f"set {TOKEN_ENV} to the cluster's token (`ray get-auth-token` prints it on the "
               f"head node), or {TOKEN_PATH_ENV} to a file holding it")
_UNREACHABLE_HELP = ("check the host and the port `ray start --head` printed (--port, 6379 by "
                     "default) and that no firewall blocks it")
_STALE_HELP = ("a cluster that stopped without `ray stop`? Start one with `ray start --head`, "
               "or delete that file")
_NOT_A_NODE = ("cannot join the Ray cluster at {address}: no Ray node runs on this machine, and a "
               "driver joins through one; run placer on a node of that cluster, or first make "
               "this machine one with `ray start --address={address}`")


def import_ray(what: str) -> Any:
    try:
        import ray  # deferred: ray is an optional extra
    except ImportError:
        raise MissingDependencyError("ray", "runtime", what) from None
    return ray


def call_on_node(func: Any, *args: Any) -> tuple[str, Any]:
    """Run as a Ray task (``ray.remote(call_on_node).remote(func, ...)``): the id of the Ray
    node it ran on, and ``func(*args)``."""
    ray = import_ray("a Ray task")
    return ray.get_runtime_context().get_node_id(), func(*args)


def init(address: str | None, what: str, **kwargs: Any) -> Any:
    """``ray.init`` once per process (an initialised Ray is reused, the address then ignored).

    ``address`` None (and no ``RAY_ADDRESS``) or ``"local"`` starts a new local instance (workers
    at niceness 0, :data:`LOCAL_SYSTEM_CONFIG`); any other address joins that cluster (``"auto"``:
    the one ``ray start`` last started on this machine). Raises InvalidInputError (source
    ``--ray-address``, or ``RAY_ADDRESS`` when the address came from there) with one line naming
    why the cluster cannot be joined.
    """
    ray = import_ray(what)
    if ray.is_initialized():
        return ray
    source = "--ray-address"
    if address in (None, "auto") and os.environ.get(ADDRESS_ENV):  # as ray.init reads it
        address, source = os.environ[ADDRESS_ENV], ADDRESS_ENV
    if address is None or address == "local":  # a local instance: its workers do this job
        kwargs = {**kwargs, "_system_config": {**LOCAL_SYSTEM_CONFIG, **kwargs.get("_system_config", {})}}
        _ray_init(ray, address="local", **kwargs)
        return ray
    recorded = None
    if address == "auto":
        address, recorded = _auto_address(ray, source)
    if not _reachable(address, CONNECT_TIMEOUT_S):
        where = f", the address {recorded} records" if recorded else ""
        raise InvalidInputError(
            f"no Ray cluster answers at {address} (nothing accepted a connection within "
            f"{CONNECT_TIMEOUT_S:g} s){where}: {_STALE_HELP if recorded else _UNREACHABLE_HELP}",
            source=source)
    client = "://" in address  # Ray Client (ray://): no local node, no GCS of its own to ask
    if not client:
        _check_local_node(ray, address, source)
    _use_token_if_available(ray)
    if not client:
        _probe(ray, address, source)
    try:
        _ray_init(ray, address=address, **kwargs)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, AuthenticationError
        raise InvalidInputError(join_failure(address, exc), source=source) from None
    return ray


def _reachable(address: str, timeout_s: float) -> bool:
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return True  # not host:port (a named address): Ray resolves it and fails fast
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _auto_address(ray: Any, source: str) -> tuple[str, str | None]:
    """``"auto"`` as Ray resolves it (the address file ``ray start`` writes, else the one GCS
    running on this machine), and the file when the address came from there."""
    try:
        path = ray._common.utils.get_ray_address_file(None)
        recorded = ray._private.utils.read_ray_address(None)
        running = sorted(ray._private.services.find_gcs_addresses())
    except AttributeError:  # another Ray: let ray.init resolve it
        return "auto", None
    if recorded:
        return recorded, path
    if len(running) == 1:
        return running[0], None
    found = f"Ray clusters at {', '.join(running)} run here" if running else \
        f"no Ray cluster runs on this machine ({path} does not exist)"
    raise InvalidInputError(f"'auto' names no single cluster: {found}; give its host:port",
                            source=source)


def _check_local_node(ray: Any, address: str, source: str) -> None:
    """A driver connects through a raylet on its own machine: with none, Ray looks for one for
    60 s (``get_node_to_connect_for_driver``), then fails."""
    try:
        nodes = ray._private.services.find_node_ids()
    except Exception:  # another Ray, or processes not listable: let ray.init find out
        return
    if not nodes:
        raise InvalidInputError(_NOT_A_NODE.format(address=address), source=source)


# ---- token authentication -----------------------------------------------------------------------


def _token_source() -> str | None:
    """Where Ray 2.60 reads this process's token from (its loader's order), or None."""
    if os.environ.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV
    path = os.environ.get(TOKEN_PATH_ENV)
    if path:
        return f"{TOKEN_PATH_ENV}={path}" if _nonempty(path) else None
    if _nonempty(os.path.expanduser(DEFAULT_TOKEN_PATH)):
        return DEFAULT_TOKEN_PATH
    return None


def _nonempty(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _has_token(ray: Any) -> bool:
    try:  # Ray's own loader (it also reads a Kubernetes service-account token)
        return bool(ray._raylet.AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))
    except Exception:
        return _token_source() is not None


def _token_mode() -> bool:
    return os.environ.get(AUTH_MODE_ENV, "").strip().lower() == "token"


def _use_token_if_available(ray: Any) -> None:
    """Token mode for this process (``RAY_AUTH_MODE=token``, as Ray's docs set it for a driver)
    when the mode is unset and a token is available: what ``ray start`` and ``ray.init("auto")``
    do, and what Ray 2.60 skips for an explicit address."""
    if AUTH_MODE_ENV in os.environ or not _has_token(ray):
        return
    os.environ[AUTH_MODE_ENV] = "token"
    with contextlib.suppress(Exception):  # Ray caches its config: read the mode again
        ray._raylet.Config.initialize("")


def _auth_failure(address: str) -> str:
    head = f"cannot join the Ray cluster at {address}: it requires token authentication and"
    source = _token_source()
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and not _token_mode():
        return f"{head} {AUTH_MODE_ENV} is {mode!r} here; set {AUTH_MODE_ENV}=token and {_TOKEN_HELP}"
    if source is None:
        return f"{head} this process has no token; {_TOKEN_HELP}"
    return f"{head} refused this process's token (from {source}); {_TOKEN_HELP}"


def _probe(ray: Any, address: str, source: str) -> None:
    """One GCS client, as ``ray.init`` makes 20 of (each up to 40 s in C++, deaf to signals):
    a refused token or a port that is no Ray GCS is known in under a second, or after
    :data:`PROBE_TIMEOUT_S`. It runs in a thread (the call releases the GIL) that the main one
    waits for in short steps, so that a signal still stops the process."""
    if _token_mode() and not _has_token(ray):
        raise InvalidInputError(_auth_failure(address), source=source)
    try:
        target = ray._private.services.canonicalize_bootstrap_address(address)
        client = ray._raylet.GcsClient
    except Exception:  # another Ray, or an address Ray resolves its own way: ray.init decides
        return
    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            client(address=target)
            outcome["ok"] = True
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="placer-ray-probe", daemon=True)
    thread.start()
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.1)
    if outcome.get("ok"):
        return
    error = outcome.get("error")
    if error is not None and _is_auth(error):
        raise InvalidInputError(_auth_failure(address), source=source)
    detail = f" ({_last_line(error)})" if error is not None else ""
    raise InvalidInputError(
        f"cannot join the Ray cluster at {address}: something accepts connections there but does "
        f"not answer as a Ray cluster within {PROBE_TIMEOUT_S:g} s{detail}; give the address "
        "`ray start --head` printed (its --port)", source=source)


# ---- failures, one line each --------------------------------------------------------------------


_AUTH = re.compile(r"unauthenticated|invalidauthtoken|authentication ?token|authenticationerror",
                   re.IGNORECASE)
_VERSIONS = re.compile(r"Version mismatch: The cluster was started with:\s+Ray: (\S+)\s+Python: (\S+)"
                       r"\s+This process on .*? was started with:\s+Ray: (\S+)\s+Python: (\S+)",
                       re.DOTALL)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_auth(exc: BaseException) -> bool:
    chain = _chain(exc)
    return any(type(e).__name__ == "AuthenticationError" for e in chain) or \
        any(_AUTH.search(f"{type(e).__name__}: {e}") for e in chain)


def _last_line(exc: BaseException) -> str:
    """The innermost exception's last non-empty line (Ray appends tracebacks to messages)."""
    for e in reversed(_chain(exc)):
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return type(exc).__name__


def join_failure(address: str, exc: BaseException) -> str:
    """The one line for ``ray.init(address=...)`` failing with ``exc``: the cause and what to set."""
    text = "\n".join(f"{type(e).__name__}: {e}" for e in _chain(exc))
    versions = _VERSIONS.search(text)
    if versions:
        cluster_ray, cluster_py, my_ray, my_py = versions.groups()
        return (f"cannot join the Ray cluster at {address}: it runs Ray {cluster_ray} on Python "
                f"{cluster_py}, this process Ray {my_ray} on Python {my_py}; run placer where "
                f"both match the cluster's (pip install 'ray=={cluster_ray}' on Python {cluster_py})")
    if _is_auth(exc):
        return _auth_failure(address)
    if "No node info found matching attributes" in text:
        return _NOT_A_NODE.format(address=address)
    return f"cannot join the Ray cluster at {address}: {_last_line(exc)}"


# ---- ray.init itself: the caller's SIGTERM handler, and no processes left behind --------------


def _ray_init(ray: Any, **kwargs: Any) -> None:
    """``ray.init(**kwargs)``, keeping the caller's SIGTERM handler (``ray.init`` installs
    ``sys.exit(15)``). When it fails or is interrupted, the processes it started are stopped,
    and a SIGTERM (Ray's handler raised ``SystemExit(15)``) goes on to the caller's handler, so
    that placer's CLI exits 143 as at any other point. Where no Python handler was set
    (SIG_DFL), Ray's stays, as ``ray.init`` leaves it."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    before = _descendants()
    try:
        ray.init(**kwargs)
    except BaseException as exc:
        sigterm = isinstance(exc, SystemExit) and exc.code == signal.SIGTERM
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)
        try:
            _stop_started(ray, before)
        finally:
            if sigterm and callable(previous):
                previous(signal.SIGTERM, sys._getframe())
        raise
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _descendants() -> set[Any]:
    try:
        import psutil  # deferred: a dependency of ray, the optional extra
        return set(psutil.Process().children(recursive=True))
    except Exception:
        return set()


def _stop_started(ray: Any, before: set[Any]) -> None:
    """``ray.shutdown()``, then kill the Ray processes this ``ray.init`` started that are still
    there (a start cut short leaves ``ray.shutdown`` nothing to stop)."""
    with contextlib.suppress(Exception):
        ray.shutdown()
    ray_dir = os.path.dirname(getattr(ray, "__file__", None) or "") or None
    for proc in _descendants() - before:
        with contextlib.suppress(Exception):  # gone already, or not ours to see
            cmdline = proc.cmdline()
            if proc.name().startswith("ray::") or any(part.startswith("ray::") for part in cmdline[:1]) \
                    or (ray_dir is not None and any(ray_dir in part for part in cmdline)):
                proc.kill()
