"""``placer apply``'s library side: a local deployment that moves to a new placement while serving.

:func:`apply_live` starts a :class:`~placer.runtime.deployment.Deployment` on the ``from``
placement, serves seeded random batches (every output compared with
:func:`~placer.runtime.model.reference_forward`), plans the move with
:func:`~placer.runtime.plan.plan_migration`, executes it live with
:func:`~placer.runtime.execute.execute_plan`, serves a few batches more on the new placement,
and checks every rank's weights against the authoritative checksums.

Expert shapes: the placement decides the routing shape (layers, experts, top-k); the hidden and
expert FFN sizes come from ``--model`` when given (a preset, or ``embedded``), else from the
embedded model placer ships (:mod:`placer.profiling.embedded`: hidden 128, expert FFN 128).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from placer.errors import InvalidInputError
from placer.presets import get_model
from placer.profiling import embedded
from placer.runtime.deployment import Deployment
from placer.runtime.execute import execute_plan
from placer.runtime.model import reference_forward
from placer.runtime.plan import MigrationPlan, plan_migration
from placer.types import ModelSpec, Placement, Topology

__all__ = ["ApplyOutcome", "apply_live", "contiguous_placement", "embedded_model", "resolve_model"]

MAX_WEIGHT_BYTES = 2e9
"""Largest total of float32 expert weights a local deployment is allowed to hold."""


def embedded_model() -> ModelSpec:
    """The embedded model's shape (its shipped ``config.json``, else the architecture it trains)."""
    cfg = dict(embedded.ARCHITECTURE)
    if embedded.CONFIG_FILE.is_file():
        cfg.update(json.loads(embedded.CONFIG_FILE.read_text()))
    layers = int(cfg["num_hidden_layers"])
    return ModelSpec(name=embedded.NAME, num_hidden_layers=layers, moe_layer_ids=tuple(range(layers)),
                     num_experts=int(cfg["num_local_experts"]), top_k=int(cfg["num_experts_per_tok"]),
                     hidden_size=int(cfg["hidden_size"]), expert_ffn_size=int(cfg["intermediate_size"]),
                     weight_bytes=4.0, activation_bytes=4.0)


def resolve_model(file_model: ModelSpec, name: str | None) -> tuple[ModelSpec, str]:
    """The model a local deployment runs for a placement made for ``file_model``.

    Routing shape from the file; hidden and FFN sizes from ``name`` (``embedded`` or a preset,
    which must have the file's layer and expert counts) or, by default, the embedded model's.
    Returns (model, a line saying where the sizes came from).
    """
    source = embedded_model() if name in (None, "embedded") else get_model(name)
    if name is not None and (source.num_moe_layers, source.num_experts) != (file_model.num_moe_layers,
                                                                           file_model.num_experts):
        raise InvalidInputError(f"model {source.name} has {source.num_moe_layers} MoE layers and "
                                f"{source.num_experts} experts; the placement is for "
                                f"{file_model.num_moe_layers} and {file_model.num_experts}", source="--model")
    model = replace(file_model, hidden_size=source.hidden_size, expert_ffn_size=source.expert_ffn_size,
                    weight_bytes=4.0, activation_bytes=4.0)
    same = source.num_moe_layers == file_model.num_moe_layers and source.num_experts == file_model.num_experts
    note = (f"{source.name}" if same and source.name == file_model.name
            else f"{file_model.name} routing with {source.name}'s expert sizes")
    return model, note


def contiguous_placement(like: Placement) -> Placement:
    """Experts in order, redundant slots round-robin (vLLM's initial map), ``like``'s shape."""
    p = np.arange(like.num_slots) % like.num_experts
    return Placement(np.tile(p, (like.num_layers, 1)), like.slots_per_gpu, like.num_experts)


@dataclass
class ApplyOutcome:
    """What :func:`apply_live` did (figures for the CLI)."""

    model: ModelSpec
    topology: Topology
    device: str
    plan: MigrationPlan
    report: object  # MigrationReport
    before_s: list[float]
    after_s: list[float]
    batches: int
    verified: int
    max_abs_err: float
    weight_mismatches: list[str]
    start_s: float
    final: Placement
    rank_nodes: list[str]  # the Ray node each rank ran on at the start
    final_rank_nodes: list[str]  # and at the end (a rank moves when Ray restarts it elsewhere)


class ReferenceCache:
    """The single-process reference output of the last batch asked for (a retried batch is
    asked for again), recomputed for any other batch.

    The cache holds the batch itself and compares identity while holding it. It used to be
    keyed by ``id(batch)``: once a batch was freed, a later batch could be allocated at the
    same address, get the same id and be checked against the stale reference of the earlier
    one (a wrong "mismatch" that depended on allocation timing, seen under CPU load).
    """

    def __init__(self, compute: Callable[[np.ndarray], np.ndarray]):
        self.compute = compute
        self._batch: np.ndarray | None = None
        self._output: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._batch is not x:
            self._output = self.compute(x)
            self._batch = x  # held: its id cannot be reused while it is cached
        assert self._output is not None
        return self._output


def _stream(seed: int, tokens: int, hidden: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        yield rng.standard_normal((tokens, hidden)).astype(np.float32)


def apply_live(new: Placement, old: Placement, model: ModelSpec, topology: Topology, *,
               dispatch: str = "nearest", ranks: int = 4, tokens: int = 64, warmup: int = 3,
               after: int = 3, seed: int = 0, timeout_s: float = 5.0,
               max_experts_per_round: int | None = 1, ray_address: str | None = None,
               progress: Callable[[str], None] | None = None,
               on_round: Callable[[int, int], None] | None = None) -> ApplyOutcome:
    """Start a local deployment on ``old``, serve, migrate live to ``new``, serve, verify.

    ``progress(message)`` is told each phase; ``on_round(done, total)`` each migration step
    served (one round of transfers per step, and a last step that commits what is left).

    Raises InvalidInputError when ``ranks`` differs from the placement's GPU count or the
    weights would exceed :data:`MAX_WEIGHT_BYTES`.
    """
    import torch  # deferred: torch is an optional extra (runtime)

    if new.num_gpus != ranks:
        raise InvalidInputError(f"the placement spans {new.num_gpus} GPUs; a deployment of {ranks} ranks "
                                f"cannot run it (use --gpus {new.num_gpus})", source="--gpus")
    total = new.num_layers * new.num_slots * model.expert_weight_bytes
    if total > MAX_WEIGHT_BYTES:
        raise InvalidInputError(f"the expert weights would take {total / 1e9:.1f} GB (float32) on this machine, "
                                f"over the {MAX_WEIGHT_BYTES / 1e9:.0f} GB a local deployment may use; "
                                "choose a smaller --model", source="--model")
    say = progress or (lambda _m: None)
    start = time.perf_counter()
    dep = Deployment(model, old, topology, dispatch=dispatch, seed=seed, timeout_s=timeout_s,
                     ray_address=ray_address)
    say(f"starting {ranks} rank actors")
    with dep:
        start_s = time.perf_counter() - start
        start_nodes = list(dep.rank_nodes)
        reference = ReferenceCache(lambda x: reference_forward(dep.weights, torch.from_numpy(x)).numpy())

        stream = _stream(seed + 1, tokens, model.hidden_size)
        batches = verified = 0
        max_err = 0.0

        def serve(n: int) -> list[float]:
            nonlocal batches, verified, max_err
            times = []
            for _ in range(n):
                x = next(stream)
                t0 = time.perf_counter()
                y = dep.forward(x)
                times.append(time.perf_counter() - t0)
                ref = reference(x)
                batches += 1
                max_err = max(max_err, float(np.abs(y - ref).max()))
                verified += bool(np.allclose(y, ref, rtol=1e-4, atol=1e-4))
            return times

        before_s = serve(warmup)
        plan = plan_migration(old, new, topology, expert_bytes=dep.weights.expert_bytes,
                              max_experts_per_round=max_experts_per_round)
        say(f"migrating: {len(plan.transfers)} transfers in {plan.num_rounds} rounds")
        steps = plan.num_rounds + 1
        report = execute_plan(dep, plan, stream, reference=reference,
                              on_step=None if on_round is None else lambda step, _r: on_round(step + 1, steps))
        batches += report.batches
        verified += report.verified
        max_err = max(max_err, report.max_abs_err)
        after_s = serve(after)
        mismatches = dep.verify_all()
        final = dep.placement
        device = dep.device
        final_nodes = list(dep.rank_nodes)
    return ApplyOutcome(model, topology, device, plan, report, before_s, after_s, batches, verified,
                        max_err, mismatches, start_s, final, start_nodes, final_nodes)
