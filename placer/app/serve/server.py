"""HTTP front of the service (stdlib ``http.server``, one thread per request).

Endpoints (every one needs ``Authorization: Bearer <token>`` when a token is configured; 401
otherwise):

``GET /healthz``
    ``{"status": "ok"}``.
``GET /metrics``
    Prometheus text format (``prometheus_client``, one registry per server).
``GET /placement?format=placer|sglang``
    The current placement; header ``X-Placer-Published`` counts publications.
``GET /status``
    Counters, configuration and the last decision as JSON.
``POST /stats``
    ``{"load": [[...]] (MoE layers x experts), "num_tokens"?, "top1_transitions"?}``; 202 with
    the observation count, 400 with ``{"error": "one line"}`` for a bad body.

Errors are JSON ``{"error": "..."}``; an unexpected exception answers 500 and is logged, the
server keeps serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from placer.app.serve.state import parse_observation
from placer.display import json_text
from placer.errors import InvalidInputError

log = logging.getLogger("placer.serve")


# (name, help, key of the service's last decision); placer_imbalance and placer_threshold come
# from the service itself.
_DECISION_GAUGES = (
    ("placer_predicted_gain", "Simulated relative step-time reduction of the last candidate.", "gain"),
    ("placer_predicted_net_gain", "Predicted gain minus the amortised migration cost.", "net_gain"),
    ("placer_migration_seconds", "Weight-transfer time of the last candidate's migration.", "migration_s"),
    ("placer_last_solve_seconds", "Wall time of the last solve.", "solve_s"),
    ("placer_last_decision_seconds", "Wall time of the last evaluation (solve, simulate, plan).", "decide_s"),
    ("placer_last_solve_timestamp_seconds", "Unix time of the last evaluation.", "time"),
)
# (name, help); the value is the service counter of the same name without ``placer_``.
_COUNTERS = (
    ("placer_placements_published_total", "Placements published since the state began."),
    ("placer_observations_total", "Load observations added to the window."),
    ("placer_bad_inputs_total", "Malformed posts and unreadable dump files skipped."),
    ("placer_evaluations_total", "Candidate evaluations run."),
)


def _gauge(name: str, text: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=float("nan") if value is None else float(value))


class _ServiceCollector(Collector):
    """The service's gauges and counters, read from it at each scrape."""

    def __init__(self, service: Any):
        self.service = service

    def collect(self) -> Iterable[Metric]:
        imbalance = self.service.current_imbalance()
        status = self.service.status()
        counters = status["counters"]
        decision = status["last_decision"] or {}
        yield _gauge("placer_imbalance", "Max/mean GPU load of the current placement on the window, median "
                                         "over layers (NaN before any observation).", imbalance)
        for name, text, key in _DECISION_GAUGES:
            yield _gauge(name, text, decision.get(key))
        yield _gauge("placer_threshold", "Net gain a candidate must exceed to be published.", status["threshold"])
        for name, text in _COUNTERS:
            yield CounterMetricFamily(name, text, value=float(counters[name.removeprefix("placer_")]))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, service: Any, token: str | None):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.service = service
        self.token = token
        self.registry = CollectorRegistry(auto_describe=False)  # this server's own: tests run several
        self.registry.register(_ServiceCollector(service))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "placer-serve"
    timeout = 30  # seconds a connection may stall (a body shorter than its Content-Length)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s %s", self.address_string(), format % args)

    # -- replies --------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, (json_text(obj, indent=None) + "\n").encode(), "application/json", headers)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": " ".join(message.split())}, headers)

    # -- dispatch -------------------------------------------------------------------------

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    def _handle(self, method: str) -> None:
        try:
            if not self._authorised():
                self._error(HTTPStatus.UNAUTHORIZED, "missing or wrong token (Authorization: Bearer <token>)",
                            {"WWW-Authenticate": 'Bearer realm="placer"'})
                return
            url = urlsplit(self.path)
            routes = {("GET", "/healthz"): self._healthz, ("GET", "/metrics"): self._metrics,
                      ("GET", "/placement"): self._placement, ("GET", "/status"): self._status,
                      ("POST", "/stats"): self._post_stats}
            route = routes.get((method, url.path))
            if route is None:
                allowed = [m for m, p in routes if p == url.path]
                if allowed:
                    self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {url.path}",
                                {"Allow": ", ".join(allowed)})
                else:
                    self._error(HTTPStatus.NOT_FOUND, f"no endpoint {url.path}; endpoints: /healthz, /metrics, "
                                                      "/placement, /status, POST /stats")
                return
            route(parse_qs(url.query))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # noqa: BLE001 - logged; the server survives
            log.exception("unexpected error answering %s %s", method, self.path)
            try:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"unexpected {type(exc).__name__}: {exc}")
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    # -- endpoints ------------------------------------------------------------------------

    def _healthz(self, query: dict[str, list[str]]) -> None:
        self._json(HTTPStatus.OK, {"status": "ok"})

    def _metrics(self, query: dict[str, list[str]]) -> None:
        self._send(HTTPStatus.OK, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)

    def _status(self, query: dict[str, list[str]]) -> None:
        self._json(HTTPStatus.OK, self.server.service.status())

    def _placement(self, query: dict[str, list[str]]) -> None:
        fmt = query.get("format", ["placer"])[-1]
        service = self.server.service
        try:
            body = service.placement_document(fmt)
        except InvalidInputError as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        self._send(HTTPStatus.OK, body, "application/json",
                   {"X-Placer-Published": str(service.published_count())})

    def _post_stats(self, query: dict[str, list[str]]) -> None:
        service = self.server.service
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "POST /stats needs a Content-Length header")
            return
        n = int(length)
        if n > service.config.max_body_bytes:
            service.record_bad("POST /stats", f"body of {n} bytes exceeds {service.config.max_body_bytes}")
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"body of {n} bytes exceeds the limit of {service.config.max_body_bytes}")
            return
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raw = b""
            self.close_connection = True
        try:
            if len(raw) != n:
                raise InvalidInputError(f"body truncated: {len(raw)} of {n} bytes", source="POST /stats")
            try:
                payload = json.loads(raw)
            except (UnicodeDecodeError, ValueError) as exc:
                raise InvalidInputError(f"body is not valid JSON ({exc})", source="POST /stats") from None
            except RecursionError:
                raise InvalidInputError("body is not valid JSON (nested too deeply)", source="POST /stats") from None
            obs = parse_observation(payload, service.config.model)
            count = service.ingest(obs)
        except InvalidInputError as exc:
            service.record_bad("POST /stats", str(exc))
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        self._json(HTTPStatus.ACCEPTED, {"accepted": True, "observations_total": count})


def make_server(service: Any, host: str, port: int, token: str | None) -> ThreadingHTTPServer:
    """Bind ``host:port`` (port 0: any free port); raises InvalidInputError when binding fails."""
    try:
        return _Server((host, port), _Handler, service, token)
    except OSError as exc:
        raise InvalidInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", source="--port") from None
