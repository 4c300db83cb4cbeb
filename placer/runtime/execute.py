"""The live migration executor: applies a :class:`~placer.runtime.plan.MigrationPlan` to a
running :class:`~placer.runtime.deployment.Deployment` while it keeps serving batches.

One plan round runs per served step: its point-to-point transfers (each rank exchanges with at
most one peer; ``max_experts_per_round`` of the planner caps the chunk) are posted as
non-blocking sends and receives on the migration process group, the step's forward runs on the
default group meanwhile, and the received experts wait in staging. At the end of the step that
runs a layer's last round, every rank checksums the experts it received for that layer against
the controller's authoritative checksums; the layer commits at the start of the next step on
every rank at once (staged experts written into their slots, then the plan's local copies, then
the layer's slot map switched), so every token of a step sees one map per layer on all ranks.
Layers that need no transfer commit at the first step.

Faults: a step that fails is rebuilt by the deployment (:class:`StepFailed`); commits sent in
that step count as done (a rank applies them before any communication, and a restarted rank is
restored with them from the authoritative copy), everything staged is dropped, the rounds of the
layers not committed yet are run again, and the batch is retried. Layers not committed stay on
the old placement throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from placer.errors import PlacerError
from placer.runtime.deployment import Deployment, Recovery, StepFailed
from placer.runtime.plan import MigrationPlan

__all__ = ["MigrationReport", "RuntimeTransferError", "execute_plan"]


class RuntimeTransferError(PlacerError, RuntimeError):
    """A migrated expert's checksum differs from the authoritative one (names layer, expert, ranks)."""


@dataclass
class MigrationReport:
    """What a live migration did, step by step.

    commit_step : int64 [L], the served step (0-based, counting retries) at which each layer
    switched; pause_s : float64 [L], the commit time of that step (max over ranks; layers that
    commit in the same step share it); step_s : wall time of every step; wait_s : per step, the
    longest wait for transfers after the forward (max over ranks); failed_steps : the steps that
    failed (their batch was served again by the next step), one per entry of ``recoveries``.
    """

    plan: MigrationPlan
    commit_step: np.ndarray
    pause_s: np.ndarray
    step_s: list[float] = field(default_factory=list)
    forward_s: list[float] = field(default_factory=list)
    wait_s: list[float] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    failed_steps: list[int] = field(default_factory=list)
    batches: int = 0
    verified: int = 0
    mismatches: list[int] = field(default_factory=list)
    max_abs_err: float = 0.0
    outputs: list[np.ndarray] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.step_s)

    def summary(self) -> dict[str, float]:
        s = self.plan.summary()
        s.update(steps=float(self.steps), batches=float(self.batches), verified=float(self.verified),
                 recoveries=float(len(self.recoveries)), max_pause_s=float(self.pause_s.max(initial=0)),
                 median_step_s=float(np.median(self.step_s)) if self.step_s else 0.0,
                 max_abs_err=self.max_abs_err)
        return s


def _batches(batches: Iterable[np.ndarray], hidden: int) -> Iterator[np.ndarray]:
    it = iter(batches)  # not ``yield from``: closing this generator must not close the caller's
    for x in it:  # noqa: UP028
        yield x
    while True:  # the migration outlasts the stream: keep stepping with empty batches
        yield np.zeros((0, hidden), np.float32)


def execute_plan(deployment: Deployment, plan: MigrationPlan, batches: Iterable[np.ndarray], *,
                 reference: Callable[[np.ndarray], np.ndarray] | None = None, rtol: float = 1e-4,
                 atol: float = 1e-4, max_retries: int = 3, keep_outputs: bool = False,
                 on_step: Callable[[int, MigrationReport], None] | None = None) -> MigrationReport:
    """Migrate ``deployment`` to ``plan.new`` while serving ``batches`` (float32 [T, H] each).

    Parameters
    ----------
    deployment : Deployment, started, running the placement the plan was made from.
    plan : MigrationPlan, from :func:`placer.runtime.plan_migration`.
    batches : iterable of arrays; one is served per step, retried after a failure. When it runs
        out before the migration ends, the remaining steps serve empty batches.
    reference : callable, optional; its output for every batch is compared with the
        deployment's (``np.allclose(rtol, atol)``); mismatches are listed in the report.
    max_retries : int, retries of one batch before giving up.
    on_step : callable(step, report), optional; called after every successful step.

    Returns
    -------
    MigrationReport (``deployment.placement`` equals ``plan.new`` afterwards).

    Raises
    ------
    RuntimeTransferError when a received expert fails its checksum; StepFailed when a batch
    fails more than ``max_retries`` times; RankLostError when a rank cannot be brought back.
    """
    t, c = plan.transfers, plan.local_copies
    s = deployment.slots_per_gpu
    num_layers = plan.new.num_layers
    if not np.array_equal(np.asarray(deployment.placement.physical_to_logical.shape),
                          np.asarray(plan.new.physical_to_logical.shape)):
        raise ValueError("the plan is for another deployment shape")
    has_transfer = np.zeros(num_layers, bool)
    has_transfer[t.layer] = True
    committed = np.zeros(num_layers, bool)
    report = MigrationReport(plan, np.full(num_layers, -1, np.int64), np.zeros(num_layers))
    sums = deployment.weights.checksums
    ready = {int(i) for i in np.flatnonzero(~has_transfer)}
    rounds = sorted(set(t.round.tolist()))
    stream = _batches(batches, deployment.weights.hidden_size)
    x = None
    retries = 0
    while not committed.all():
        if x is None:
            x = next(stream)
        r = rounds[0] if rounds else None
        now = np.flatnonzero((t.round == r) & ~committed[t.layer]) if r is not None else np.zeros(0, int)
        later = ~committed[t.layer] & (t.round > (r if r is not None else -1))
        verify_layers = set(t.layer[now].tolist()) - set(t.layer[later].tolist())
        commits = sorted(ready)
        messages: list[dict[str, list[Any]]] = [{"commits": [], "sends": [], "recvs": [], "verify": []}
                                                 for _ in range(deployment.num_ranks)]
        for layer in commits:
            into = np.flatnonzero(t.layer == layer)
            local = np.flatnonzero(c.layer == layer)
            for g in range(deployment.num_ranks):
                writes = [(int(t.slot[i]) - g * s, (layer, int(t.slot[i]) - g * s))
                          for i in into if t.dst_gpu[i] == g]
                copies = [(int(c.slot[k]) - g * s, int(c.src_slot[k]) - g * s) for k in local if c.gpu[k] == g]
                messages[g]["commits"].append({"layer": layer, "writes": writes, "copies": copies,
                                               "map": deployment.layer_map(layer, g, plan.new)})
            deployment.commit_layer(layer, plan.new)  # applied by every rank before any collective
            committed[layer] = True
        for i in now.tolist():
            layer, src, dst = int(t.layer[i]), int(t.src_gpu[i]), int(t.dst_gpu[i])
            messages[src]["sends"].append((i, dst, layer, int(t.src_slot[i]) - src * s))
            messages[dst]["recvs"].append((i, src, layer, int(t.slot[i]) - dst * s))
            if layer in verify_layers:
                messages[dst]["verify"].append((layer, int(t.slot[i]) - dst * s,
                                                sums[layer, int(t.expert[i])]))
        ready = set()
        step = report.steps
        start = time.perf_counter()
        try:
            y, times, bad = deployment.step(x, messages)
        except StepFailed as exc:
            report.step_s.append(time.perf_counter() - start)
            report.forward_s.append(float("nan"))
            report.wait_s.append(float("nan"))
            report.recoveries.append(exc.recovery)
            report.failed_steps.append(step)
            report.commit_step[commits] = step
            retries += 1
            if retries > max_retries:
                raise
            ready = {int(i) for i in np.flatnonzero(~has_transfer & ~committed)}
            rounds = sorted(set(t.round[~committed[t.layer]].tolist()))
            continue
        report.step_s.append(time.perf_counter() - start)
        report.forward_s.append(max(tm["forward"] for tm in times))
        report.wait_s.append(max(tm["wait"] for tm in times))
        report.commit_step[commits] = step
        report.pause_s[commits] = max(tm["commit"] for tm in times)
        for g, wrong in enumerate(bad):
            for layer, slot, _ in wrong:
                i = int(np.flatnonzero((t.layer == layer) & (t.slot == slot + g * s))[0])
                raise RuntimeTransferError(
                    f"layer {layer}: expert {int(t.expert[i])} sent from rank {int(t.src_gpu[i])} to "
                    f"rank {g} (slot {slot + g * s}) fails its checksum; the layer was not committed")
        ready = verify_layers
        if rounds:
            rounds.pop(0)
        retries = 0
        _check(report, x, y, reference, rtol, atol, keep_outputs)
        if on_step is not None:
            on_step(step, report)
        x = None
    if not np.array_equal(deployment.placement.physical_to_logical, plan.new.physical_to_logical):
        raise AssertionError("the deployment does not run the plan's placement after the migration")
    return report


def _check(report: MigrationReport, x: np.ndarray, y: np.ndarray,
           reference: Callable[[np.ndarray], np.ndarray] | None, rtol: float, atol: float,
           keep: bool) -> None:
    if x.shape[0] == 0:
        return
    report.batches += 1
    if keep:
        report.outputs.append(y)
    if reference is None:
        return
    ref = reference(x)
    err = float(np.max(np.abs(ref - y))) if y.size else 0.0
    report.max_abs_err = max(report.max_abs_err, err)
    if np.allclose(y, ref, rtol=rtol, atol=atol):
        report.verified += 1
    else:
        report.mismatches.append(report.steps - 1)
