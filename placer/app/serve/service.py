"""The rebalancing service: window, decisions, publication, persistence, threads.

Three threads besides the caller's: the HTTP server (:mod:`placer.app.serve.server`), the
directory watcher (every ``interval_s``) and the solver (every ``interval_s``, when
observations arrived since its last evaluation; one evaluation at a time, holding no lock
while it solves and simulates, so the HTTP server stays responsive).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from placer.app.serve.policy import Decision, PolicyConfig, evaluate, imbalance
from placer.app.serve.server import make_server
from placer.app.serve.state import Observation, ServiceState, Window, load_state, save_state
from placer.app.serve.watcher import DirectoryWatcher
from placer.display import format_value
from placer.errors import InvalidInputError, PlacerError
from placer.ilp import PlacementProblem, solve
from placer.io.atomic import atomic_write_bytes
from placer.io.placements import export_placement, write_placement_json
from placer.stacks import STACKS, Stack
from placer.types import ModelSpec, Placement, Topology

log = logging.getLogger("placer.serve")
PLACEMENT_FORMATS = ("placer", "sglang")
TOKEN_ENV = "PLACER_SERVE_TOKEN"


@dataclass(frozen=True)
class ServeConfig:
    """Everything :class:`Service` needs. ``initial``: the placement the serving stack runs now
    (None: ``contiguous``, slot p holds expert p % E, what SGLang and vLLM run without a file)."""

    model: ModelSpec
    topology: Topology
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    half_life: float = 8.0
    interval_s: float = 5.0
    watch_dir: str | None = None
    state_path: str | None = None
    output_path: str | None = None
    exports: tuple[tuple[str, str], ...] = ()
    initial: Placement | None = None
    initial_source: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_body_bytes: int = 64 * 2**20
    stack: Stack | None = None


def is_local_host(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _render(placement: Placement, model: ModelSpec, topology: Topology, dispatch: str, method: str,
            metrics: dict[str, Any], stack: Stack | None = None) -> dict[str, bytes]:
    """The placement in every served format SGLang 0.5.23 can load for this model, rendered by
    the library's own writers (vLLM 0.34.0 loads no placement file)."""
    docs: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="placer-serve-") as tmp:
        path = os.path.join(tmp, "placer.json")
        write_placement_json(path, placement, model=model, topology=topology, dispatch=dispatch, method=method,
                             status="feasible", solve_seconds=float(metrics.get("solve_s") or 0.0), metrics=metrics,
                             stack=stack)
        with open(path, "rb") as f:
            docs["placer"] = f.read()
        try:
            STACKS["sglang"].check_model(model)
        except InvalidInputError:
            return docs
        path = os.path.join(tmp, "sglang.json")
        export_placement(placement, "sglang", path, model=model, topology=topology)
        with open(path, "rb") as f:
            docs["sglang"] = f.read()
    return docs


class Service:
    """A rebalancing service; :meth:`start` binds and starts the threads, :meth:`stop` ends them."""

    def __init__(self, config: ServeConfig):
        self.config = config
        model, topology, policy = config.model, config.topology, config.policy
        if not model.sizes_known:
            raise InvalidInputError(f"model {model.name} has no hidden/expert sizes; the service's simulator "
                                    "needs them (use a preset)", source="--model")
        if not is_local_host(config.host) and not config.token:
            raise InvalidInputError(f"binding the non-local address {config.host} needs a token (--token or "
                                    f"{TOKEN_ENV}); requests without it get 401", source="--host")
        if not config.interval_s > 0 or not math.isfinite(config.interval_s):
            raise InvalidInputError(f"must be positive seconds, got {config.interval_s}", source="--interval")
        if config.watch_dir is not None and not os.path.isdir(config.watch_dir):
            raise InvalidInputError("not a directory", source=config.watch_dir)
        state = load_state(config.state_path, model, topology, config.half_life) if config.state_path else None
        if state is not None:
            self.origin = f"resumed from state file {config.state_path}"
        else:
            if config.initial is not None:
                placement, method = config.initial, "initial"
                self.origin = f"initial placement from {config.initial_source or 'the caller'}"
            else:
                problem = PlacementProblem(Window(model.num_moe_layers, model.num_experts, 1.0).stats(model),
                                           model, topology, num_redundant=policy.redundant)
                contiguous = solve(problem, "contiguous").placement
                assert contiguous is not None  # contiguous always gives one
                placement = contiguous
                method = "contiguous"
                self.origin = ("initial placement: contiguous (slot p holds expert p % E, what SGLang and vLLM "
                               "run without a placement file)")
            state = ServiceState(Window(model.num_moe_layers, model.num_experts, config.half_life),
                                 placement, method)
        if state.placement.num_redundant != policy.redundant:
            raise InvalidInputError(f"the current placement has {state.placement.num_redundant} redundant slots per "
                                    f"layer but --redundant is {policy.redundant}", source="--redundant")
        self.state = state
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._evaluated = state.last_decision.get("observations", 0) if state.last_decision else 0
        self._dirty = False
        self._imbalance_key: tuple[int, int] | None = None
        self._imbalance = float("nan")
        self._watcher = DirectoryWatcher(config.watch_dir, model, dict(state.seen)) if config.watch_dir else None
        self._docs = self._render_current()

    # ---------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------

    def ingest(self, obs: Observation) -> int:
        """Add one observation to the window; returns the observation count."""
        with self._lock:
            self.state.window.add(obs)
            self.state.counters["observations_total"] += 1
            self._dirty = True
            n = self.state.counters["observations_total"]
        log.info("observation %d from %s", n, obs.source)
        return n

    def record_bad(self, source: str, message: str) -> None:
        with self._lock:
            self.state.counters["bad_inputs_total"] += 1
            self._dirty = True
        log.warning("skipped bad input: %s", message if message.startswith(source) else f"{source}: {message}")

    def scan_once(self) -> None:
        """One directory scan (the watcher thread calls this every interval)."""
        if self._watcher is None:
            return
        result = self._watcher.scan()  # reads files without holding the lock
        with self._lock:
            if self.state.seen != self._watcher.seen:
                self.state.seen = dict(self._watcher.seen)
                self._dirty = True
        for obs in result.observations:
            try:
                self.ingest(obs)
            except InvalidInputError as exc:
                self.record_bad(obs.source, " ".join(str(exc).split()))
        for source, message in result.bad:
            self.record_bad(source, message)

    # ---------------------------------------------------------------------------------------
    # Decisions
    # ---------------------------------------------------------------------------------------

    def evaluate_once(self) -> Decision | None:
        """Evaluate a candidate when observations arrived since the last evaluation; maybe publish."""
        cfg = self.config
        with self._lock:
            observations = self.state.counters["observations_total"]
            if observations == self._evaluated or self.state.window.count == 0:
                return None
            stats = self.state.window.stats(cfg.model)
            current = self.state.placement
        log.info("re-solving with %s on %d observations", cfg.policy.method, observations)
        try:
            decision, candidate = evaluate(current, stats, cfg.model, cfg.topology, cfg.policy, observations)
        except Exception as exc:  # noqa: BLE001 - recorded as this window's decision; not retried until new data
            if not isinstance(exc, PlacerError):
                log.exception("unexpected error evaluating %d observations", observations)
            decision, candidate = Decision(observations=observations, method=cfg.policy.method, publish=False,
                                           reason=f"error: {type(exc).__name__}: {' '.join(str(exc).split())}",
                                           threshold=cfg.policy.threshold, time=time.time()), None
            log.warning("evaluation of %d observations failed: %s", observations, decision.reason)
        with self._lock:
            self._evaluated = observations
            self.state.counters["evaluations_total"] += 1
            self.state.last_decision = decision.to_dict()
            self._dirty = True
            if decision.publish and candidate is not None and self.state.placement is current:
                self._publish(candidate, decision)
        log.info("evaluated %d observations: gain %s, migration %.3g s, %s -> %s", observations,
                 format_value("gain", decision.gain), decision.migration_s,
                 decision.reason, "published" if decision.publish else "kept")
        return decision

    def _publish(self, placement: Placement, decision: Decision) -> None:
        """Make ``placement`` current: state file first, then the output files (all atomic)."""
        self.state.placement = placement
        self.state.placement_method = self.config.policy.method
        self.state.counters["placements_published_total"] += 1
        self._docs = self._render_current()
        self.save()
        self._write_outputs()

    def _metrics_doc(self) -> dict[str, Any]:
        d = self.state.last_decision or {}
        return {"origin": self.origin, "observations": self.state.counters["observations_total"],
                "published": self.state.counters["placements_published_total"],
                **{k: d.get(k) for k in ("gain", "net_gain", "migration_s", "solve_s")}}

    def _render_current(self) -> dict[str, bytes]:
        return _render(self.state.placement, self.config.model, self.config.topology,
                       self.config.policy.dispatch, self.state.placement_method, self._metrics_doc(),
                       self.config.stack)

    def _write_outputs(self) -> None:
        cfg = self.config
        try:
            if cfg.output_path:
                atomic_write_bytes(cfg.output_path, self._docs["placer"])
            for fmt, path in cfg.exports:
                export_placement(self.state.placement, fmt, path, model=cfg.model, topology=cfg.topology)
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the service
            log.error("cannot write the placement: %s", " ".join(str(exc).split()))

    # ---------------------------------------------------------------------------------------
    # Views
    # ---------------------------------------------------------------------------------------

    def placement_document(self, fmt: str) -> bytes:
        if fmt not in PLACEMENT_FORMATS:
            raise InvalidInputError(f"unknown format {fmt!r}; formats: {', '.join(PLACEMENT_FORMATS)}",
                                    source="format")
        with self._lock:
            if fmt not in self._docs:
                raise InvalidInputError(f"{STACKS[fmt].label} cannot place {self.config.model.name}", source="format")
            return self._docs[fmt]

    def published_count(self) -> int:
        with self._lock:
            return self.state.counters["placements_published_total"]

    def current_imbalance(self) -> float:
        with self._lock:
            key = (self.state.counters["observations_total"], self.state.counters["placements_published_total"])
            if key != self._imbalance_key:
                stats = self.state.window.stats(self.config.model)
                self._imbalance = imbalance(self.state.placement, self.config.topology, stats,
                                            self.config.policy.dispatch) if self.state.window.count else float("nan")
                self._imbalance_key = key
            return self._imbalance

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"model": self.config.model.name, "gpus": self.config.topology.num_gpus,
                    "origin": self.origin, "method": self.config.policy.method,
                    "placement_method": self.state.placement_method,
                    "threshold": self.config.policy.threshold, "horizon_s": self.config.policy.horizon_s,
                    "half_life": self.config.half_life, "counters": dict(self.state.counters),
                    "evaluated_observations": self._evaluated, "last_decision": self.state.last_decision}

    # ---------------------------------------------------------------------------------------
    # Life cycle
    # ---------------------------------------------------------------------------------------

    def save(self) -> None:
        if not self.config.state_path:
            return
        with self._lock:
            save_state(self.config.state_path, self.state, self.config.model, self.config.topology)
            self._dirty = False

    def _loop(self, what: str, func) -> None:
        while not self._stop.wait(self.config.interval_s):
            try:
                func()
                if self._dirty:
                    self.save()
            except Exception:  # noqa: BLE001 - logged; the service survives
                log.exception("%s failed; the service continues", what)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Bind, write the current placement, start the threads; returns (host, port)."""
        self._server = make_server(self, self.config.host, self.config.port, self.config.token)
        log.info("%s", self.origin)
        self.save()
        self._write_outputs()
        threads = [("placer-serve-http", lambda: self._server.serve_forever(poll_interval=0.1)),
                   ("placer-serve-solver", lambda: self._loop("evaluation", self.evaluate_once))]
        if self._watcher is not None:
            threads.append(("placer-serve-watcher", lambda: self._loop("directory scan", self.scan_once)))
        for name, target in threads:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self.address

    def stop(self) -> None:
        """Stop the threads, close the socket, save the state."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in self._threads:
            t.join(timeout=60)
        self._threads.clear()
        try:
            self.save()
        except Exception:  # noqa: BLE001
            log.exception("cannot save the state on shutdown")
