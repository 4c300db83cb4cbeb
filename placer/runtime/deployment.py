"""The controller of an expert-parallel deployment on Ray: ranks, process groups, faults.

:class:`Deployment` starts one Ray actor per rank (:class:`placer.runtime.worker.EPRank`;
``num_gpus=1`` each where the cluster has a GPU per rank, else CPU with a share of the CPUs)
in a placement group with one bundle per node of the placement's topology (the resources of its
``gpus_per_node`` ranks; strategy ``SPREAD``, so each bundle goes to another Ray node while the
cluster has them, and a one-node cluster holds them all): ranks ``n * gpus_per_node ...`` share
node ``n``'s bundle, as they share a machine in the topology. ``rank_nodes`` says which Ray node
each rank runs on. When the cluster cannot hold the bundles within :data:`PLACEMENT_WAIT_S`, the
start fails with one line. It joins them in torch.distributed process groups (gloo on CPU, NCCL on GPU) with a rendezvous
on rank 0's host and a timeout of a few seconds, and installs every rank's experts from the
authoritative copy it keeps in the driver (:class:`placer.runtime.model.ExpertWeights`).

A step sends each rank its tokens (home rank = token index modulo the rank count, placer's
default) and, during a migration, that step's commits and transfers; the outputs are gathered
back in token order. When a step fails (a rank died, or a peer's collective timed out) the
controller waits for every rank's call to end, finds the ranks Ray restarted (``max_restarts``;
a restart shows as a new incarnation id), tears the process groups down on the others, builds
new ones on a fresh port, reinstalls the restarted ranks' experts for the last committed
placement from the authoritative copy, and raises :class:`StepFailed` so that the caller retries
the batch. What the step would have staged is dropped everywhere. When a Ray node leaves the
cluster, Ray moves the placement group's bundles that were on it to nodes with room and restarts
their ranks there (the same repair); where no node has room, the ranks do not come back and
:class:`RankLostError` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from placer._ray import init as ray_init
from placer.errors import ClusterError, InvalidInputError
from placer.metrics.dispatch import dispatch_table
from placer.runtime.model import ExpertWeights, init_weights
from placer.runtime.worker import EPRank
from placer.types import DISPATCH_RULES, POSITION_RULES, ModelSpec, Placement, Topology

__all__ = ["Deployment", "PLACEMENT_WAIT_S", "RankLostError", "Recovery", "StepFailed"]

PLACEMENT_WAIT_S = 60.0
"""How long :meth:`Deployment.start` waits for the cluster to hold the placement group."""


class RankLostError(ClusterError):
    """A rank cannot be brought back (Ray's restarts are used up, or the rebuild keeps failing)."""


class StepFailed(ClusterError):
    """A step failed and the deployment was rebuilt; the batch must be retried."""

    def __init__(self, message: str, recovery: Recovery):
        super().__init__(message)
        self.recovery = recovery


@dataclass
class Recovery:
    """One failure and its repair: which ranks restarted, and how long each phase took (s)."""

    step: int
    cause: str
    restarted: list[int] = field(default_factory=list)
    detect_s: float = 0.0
    rebuild_s: float = 0.0


class Deployment:
    """A live expert-parallel deployment of ``model`` under ``placement``, one Ray actor per rank.

    Parameters
    ----------
    model : ModelSpec
        Shapes (``hidden_size``, ``expert_ffn_size`` must be known; experts are float32 here).
    placement : Placement
        The placement to start with, ``physical_to_logical: [L, P]``; one rank per GPU.
    topology : Topology
        Its GPU count must match the placement's (used by the dispatch rule).
    weights : ExpertWeights, optional
        The authoritative weights (default: :func:`init_weights` with ``seed``).
    dispatch : str
        Replica rule (:mod:`placer.metrics.dispatch`): ``nearest``, ``sglang-static``, ``sglang-dynamic`` or ``vllm``.
    timeout_s : float
        Process-group timeout: how long a collective waits for a dead peer.
    max_restarts : int
        Ray restarts allowed per rank.
    cpus_per_rank : float, optional
        Default: the cluster's CPUs divided among the ranks, at most 1.
    ray_address : str, optional
        Connect to this Ray cluster; default: the running local instance, or a new one.

    Use as a context manager, or call :meth:`start` and :meth:`shutdown`.
    """

    def __init__(self, model: ModelSpec, placement: Placement, topology: Topology, *,
                 weights: ExpertWeights | None = None, dispatch: str = "nearest", seed: int = 0,
                 timeout_s: float = 5.0, max_restarts: int = 3, cpus_per_rank: float | None = None,
                 ray_address: str | None = None) -> None:
        if dispatch not in DISPATCH_RULES:
            raise InvalidInputError(f"unknown dispatch rule {dispatch!r}", source="dispatch")
        if placement.num_gpus != topology.num_gpus:
            raise InvalidInputError(f"placement spans {placement.num_gpus} GPUs, cluster has "
                                    f"{topology.num_gpus}", source="placement")
        if placement.num_layers != model.num_moe_layers or placement.num_experts != model.num_experts:
            raise InvalidInputError(f"placement is [{placement.num_layers} layers, {placement.num_experts} "
                                    f"experts], model {model.name} has {model.num_moe_layers} MoE layers "
                                    f"and {model.num_experts} experts", source="placement")
        self.model, self.topology, self.dispatch = model, topology, dispatch
        self.weights = weights if weights is not None else init_weights(model, seed=seed)
        self.num_ranks, self.slots_per_gpu = placement.num_gpus, placement.slots_per_gpu
        self.timeout_s, self.max_restarts = float(timeout_s), int(max_restarts)
        self.cpus_per_rank, self.ray_address = cpus_per_rank, ray_address
        # What runs: every layer's map comes from one full placement (its dispatch table).
        self._layer_source: list[Placement] = [placement] * placement.num_layers
        self._tables: dict[int, tuple[Placement, np.ndarray]] = {}
        self.actors: list[Any] = []
        self.rank_nodes: list[str] = []
        self.placement_group: Any = None
        self.incarnations: list[str] = []
        self.recoveries: list[Recovery] = []
        self.device = "cpu"
        self.steps = 0
        self._started_ray = False

    # ---- state ----------------------------------------------------------------------------

    @property
    def placement(self) -> Placement:
        """The committed placement: every layer's map as the ranks run it now."""
        rows = [src.physical_to_logical[i] for i, src in enumerate(self._layer_source)]
        return Placement(np.stack(rows), self.slots_per_gpu, self.model.num_experts)

    def _table(self, source: Placement) -> np.ndarray:
        key = id(source)  # the entry keeps ``source`` alive, so its id stays unique
        if key not in self._tables:
            self._tables[key] = (source, dispatch_table(source, self.topology, self.dispatch, model=self.model)
                                 if self.dispatch not in POSITION_RULES else np.empty(0))
        return self._tables[key][1]

    def layer_map(self, layer: int, rank: int, source: Placement | None = None) -> tuple:
        """The slot-map spec rank ``rank`` dispatches layer ``layer`` with (under ``source``)."""
        src = self._layer_source[layer] if source is None else source
        if self.dispatch in POSITION_RULES:
            return ("positions", self.dispatch, src.log2phy()[layer], src.logcnt()[layer])
        return ("table", self._table(src)[layer, rank])

    def rank_weights(self, rank: int) -> np.ndarray:
        """Weights of rank ``rank``'s slots under the committed placement, [L, S, W]."""
        s = self.slots_per_gpu
        p2l = self.placement.physical_to_logical[:, rank * s:(rank + 1) * s]
        return self.weights.experts[np.arange(p2l.shape[0])[:, None], p2l]

    def commit_layer(self, layer: int, source: Placement) -> None:
        """Record that ``layer`` now runs ``source``'s map (the ranks were told in a step)."""
        self._layer_source[layer] = source

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> Deployment:
        """Start Ray if needed, the rank actors, their process groups, and load the experts."""
        import ray  # deferred: ray is an optional extra (runtime)

        if not ray.is_initialized():
            ray_init(self.ray_address, "a placer deployment (--ray-address)", include_dashboard=False, log_to_driver=False)
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0.0) >= self.num_ranks
        self.device = "cuda" if gpus else "cpu"
        cpus = self.cpus_per_rank
        if cpus is None:  # a share of the free CPUs (0 when none are free: ranks mostly wait)
            free = float(ray.available_resources().get("CPU", 0.0))
            cpus = float(np.floor(min(1.0, free / self.num_ranks) * 100) / 100)
        per_node = self.topology.gpus_per_node
        self.placement_group = self._reserve(ray, cpus * per_node, per_node if gpus else 0)
        cls = ray.remote(EPRank)
        options = dict(num_cpus=cpus, num_gpus=1 if gpus else 0, max_restarts=self.max_restarts, max_task_retries=0)
        router = np.array(self.weights.router)  # by value: a restarted actor needs no live object ref
        self.actors = [cls.options(**options, **self._in_bundle(r // per_node)).remote(
                           r, self.num_ranks, hidden_size=self.weights.hidden_size, ffn_size=self.weights.ffn_size,
                           top_k=self.weights.top_k, slots_per_gpu=self.slots_per_gpu, router=router,
                           device=self.device)
                       for r in range(self.num_ranks)]
        self.incarnations = [inc for inc, _ in ray.get([a.ping.remote() for a in self.actors])]
        self.rank_nodes = self._nodes(ray)
        self._init_groups()
        self._load(range(self.num_ranks))
        return self

    def _nodes(self, ray: Any) -> list[str]:
        """The Ray node each rank runs on now."""
        return ray.get([a.node_id.remote() for a in self.actors], timeout=60)

    def _reserve(self, ray: Any, cpus: float, gpus: int) -> Any:
        """The placement group: one bundle per topology node; None when a rank needs nothing."""
        from ray.util.placement_group import (  # deferred: ray is an optional extra (runtime)
            placement_group,
            remove_placement_group,
        )

        bundle = {k: v for k, v in (("CPU", round(cpus, 2)), ("GPU", gpus)) if v > 0}
        if not bundle:  # no free CPU: ranks are scheduled without a reservation
            return None
        pg = placement_group([bundle] * self.topology.num_nodes, strategy="SPREAD")
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - GetTimeoutError: the cluster cannot hold it
            remove_placement_group(pg)
            have = {k: ray.cluster_resources().get(k, 0.0) for k in bundle}
            raise RankLostError(
                f"the Ray cluster cannot hold {self.num_ranks} ranks within {PLACEMENT_WAIT_S:g} s: they need "
                f"{self.topology.num_nodes} x {bundle} (one bundle per node of the placement's topology), the "
                f"cluster has {have} in all ({type(exc).__name__})") from None
        return pg

    def _in_bundle(self, index: int) -> dict[str, Any]:
        if self.placement_group is None:
            return {}
        from ray.util.scheduling_strategies import (  # deferred: ray is an optional extra (runtime)
            PlacementGroupSchedulingStrategy,
        )

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.placement_group, placement_group_bundle_index=index)}

    def _init_groups(self) -> None:
        import ray  # deferred: ray is an optional extra (runtime)

        host, port = ray.get(self.actors[0].address.remote())
        method = f"tcp://{host}:{port}"
        ray.get([a.init_group.remote(method, self.timeout_s) for a in self.actors],
                timeout=self.timeout_s * 6 + 30)

    def _load(self, ranks) -> None:
        import ray  # deferred: ray is an optional extra (runtime)

        refs = []
        for r in ranks:
            maps = [self.layer_map(i, r) for i in range(self.model.num_moe_layers)]
            refs.append(self.actors[r].load.remote(self.rank_weights(r), maps))
        ray.get(refs)

    def reload(self, placement: Placement, *, dispatch: str | None = None) -> None:
        """Install ``placement`` (and optionally another dispatch rule) on every rank from the
        authoritative copy, without a migration."""
        if placement.physical_to_logical.shape != self.placement.physical_to_logical.shape \
                or placement.slots_per_gpu != self.slots_per_gpu:
            raise InvalidInputError("the placement has another shape than the deployment's",
                                    source="placement")
        if dispatch is not None:
            if dispatch not in DISPATCH_RULES:
                raise InvalidInputError(f"unknown dispatch rule {dispatch!r}", source="dispatch")
            self.dispatch = dispatch
            self._tables.clear()
        self._layer_source = [placement] * placement.num_layers
        self._load(range(self.num_ranks))

    def shutdown(self) -> None:
        """Kill the rank actors (and stop Ray if this deployment started it)."""
        import ray  # deferred: ray is an optional extra (runtime)

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group  # deferred: ray (extra)

            remove_placement_group(self.placement_group)
            self.placement_group = None
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- steps ----------------------------------------------------------------------------

    def split(self, x: np.ndarray) -> list[np.ndarray]:
        """Each rank's tokens: token ``t`` starts on rank ``t % ranks``."""
        return [np.ascontiguousarray(x[r::self.num_ranks]) for r in range(self.num_ranks)]

    def gather(self, parts: list[np.ndarray], num_tokens: int) -> np.ndarray:
        out = np.empty((num_tokens, self.weights.hidden_size), dtype=np.float32)
        for r, part in enumerate(parts):
            out[r::self.num_ranks] = part
        return out

    def step(self, x: np.ndarray, messages: list[dict] | None = None) -> tuple[np.ndarray, list[dict], list[list]]:
        """One forward of batch ``x: [T, H]`` on every rank, with per-rank migration ``messages``.

        Returns (output [T, H], per-rank step timings, per-rank failed verifications). On a
        failure the deployment is rebuilt and :class:`StepFailed` is raised: retry the batch.
        """
        import ray  # deferred: ray is an optional extra (runtime)

        x = np.asarray(x, dtype=np.float32)
        empty: dict[str, list[Any]] = {"commits": [], "sends": [], "recvs": [], "verify": []}
        messages = messages or [empty] * self.num_ranks
        parts = self.split(x)
        start = time.perf_counter()
        refs = [a.step.remote(parts[r], **messages[r]) for r, a in enumerate(self.actors)]
        results: list[Any] = [None] * len(refs)
        errors: dict[int, BaseException] = {}
        first_error = None
        pending = dict(enumerate(refs))
        deadline = start + 4 * self.timeout_s + 60
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1,
                                timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:  # a rank hangs past every timeout: treat it as lost
                for r in pending:
                    errors[r] = TimeoutError(f"rank {r} did not answer step {self.steps}")
                break
            r = next(k for k, v in pending.items() if v == ready[0])
            del pending[r]
            try:
                results[r] = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - a dead actor or a timed-out collective
                errors[r] = exc
                first_error = first_error or time.perf_counter()
        if errors:
            cause = "; ".join(f"rank {r}: {type(e).__name__}" for r, e in sorted(errors.items()))
            recovery = Recovery(step=self.steps, cause=cause,
                                detect_s=(first_error or time.perf_counter()) - start)
            self._recover(recovery)
            raise StepFailed(f"step {self.steps} failed ({cause}); deployment rebuilt", recovery)
        self.steps += 1
        y = self.gather([res[0] for res in results], x.shape[0])
        return y, [res[1] for res in results], [res[2] for res in results]

    def forward(self, x: np.ndarray, *, retries: int = 3) -> np.ndarray:
        """Serve one batch (retried after a rebuild, at most ``retries`` times)."""
        for attempt in range(retries + 1):
            try:
                return self.step(x)[0]
            except StepFailed:
                if attempt == retries:
                    raise
        raise AssertionError("unreachable")

    def _recover(self, recovery: Recovery, attempts: int = 3) -> None:
        import ray  # deferred: ray is an optional extra (runtime)

        start = time.perf_counter()
        last: BaseException | None = None
        for _ in range(attempts):
            pings = [self._ping(r, recovery.step) for r in range(self.num_ranks)]
            restarted = [r for r, (inc, _) in enumerate(pings) if inc != self.incarnations[r]]
            recovery.restarted = sorted(set(recovery.restarted) | set(restarted))
            self.incarnations = [inc for inc, _ in pings]
            try:
                ray.get([a.teardown.remote() for a in self.actors], timeout=60)
                self._init_groups()
                self._load(restarted)
                self.rank_nodes = self._nodes(ray)
                break
            except Exception as exc:  # noqa: BLE001 - another failure while rebuilding: again
                last = exc
        else:
            raise RankLostError(f"rebuilding the process groups failed {attempts} times: {last}")
        recovery.rebuild_s = time.perf_counter() - start
        self.recoveries.append(recovery)

    def _ping(self, rank: int, step: int, wait_s: float = 120.0) -> tuple[str, int]:
        """Rank ``rank``'s (incarnation, pid), waiting while Ray restarts it."""
        import ray  # deferred: ray is an optional extra (runtime)
        from ray.exceptions import ActorUnavailableError, GetTimeoutError  # deferred: ray (extra)

        deadline = time.perf_counter() + wait_s
        while True:
            try:
                return ray.get(self.actors[rank].ping.remote(), timeout=max(1.0, deadline - time.perf_counter()))
            except (ActorUnavailableError, GetTimeoutError) as exc:  # restarting: ask again
                if time.perf_counter() > deadline:
                    raise RankLostError(f"rank {rank} did not come back within {wait_s:.0f} s after "
                                        f"step {step}{self._why_not_placed(ray)}") from exc
                time.sleep(0.1)
            except Exception as exc:  # noqa: BLE001 - died for good (restarts used up)
                raise RankLostError(f"rank {rank} could not be restarted after step {step}: "
                                    f"{type(exc).__name__}") from exc

    def _why_not_placed(self, ray: Any) -> str:
        if self.placement_group is None:
            return ""
        try:
            state = ray.util.placement_group_table(self.placement_group).get("state", "")
        except Exception:  # noqa: BLE001 - the state is only a hint
            return ""
        if state in ("RESCHEDULING", "PENDING"):
            return (": a Ray node that held ranks left the cluster and no remaining node has room for "
                    "its bundle of the placement group")
        return ""

    def verify_all(self) -> list[str]:
        """Compare every slot of every rank with the authoritative checksums of the committed
        placement; returns one line per mismatch (empty when all match)."""
        import ray  # deferred: ray is an optional extra (runtime)

        p2l = self.placement.physical_to_logical
        s = self.slots_per_gpu
        out = []
        for r, sums in enumerate(ray.get([a.checksums.remote() for a in self.actors])):
            for layer, row in enumerate(sums):
                for j, got in enumerate(row):
                    e = int(p2l[layer, r * s + j])
                    if got != self.weights.checksums[layer, e]:
                        out.append(f"layer {layer}: rank {r} slot {r * s + j} should hold expert {e} "
                                   "but its checksum differs")
        return out
