"""Applying placements to a live expert-parallel deployment.

``placer.runtime.plan`` (pure numpy) turns an old and a new ``physical_to_logical [L, P]`` into
a :class:`MigrationPlan`: a relabel of the new placement that keeps the most expert weights in
place, per-slot transfers with their sources, rounds in which each rank talks to one peer, a
staging bound and a per-layer commit order. This package imports neither torch nor ray; code
that executes plans imports them itself.

The live side (torch and Ray, imported on first use): :mod:`placer.runtime.model` (the MoE
block, its authoritative weights and the single-process reference), :mod:`placer.runtime.worker`
(one rank, a Ray actor), :mod:`placer.runtime.deployment` (the controller: ranks, process
groups, faults), :mod:`placer.runtime.execute` (the live migration executor) and
:mod:`placer.runtime.apply` (``placer apply``).
"""

import importlib

from placer.runtime.plan import (
    LocalCopies,
    MigrationPlan,
    Transfers,
    apply_plan,
    naive_bytes,
    plan_files,
    plan_migration,
)

_LIVE = {"Deployment": "deployment", "StepFailed": "deployment", "RankLostError": "deployment",
         "Recovery": "deployment", "execute_plan": "execute", "MigrationReport": "execute",
         "RuntimeTransferError": "execute", "ExpertWeights": "model", "init_weights": "model",
         "reference_forward": "model", "apply_live": "apply"}

__all__ = ["LocalCopies", "MigrationPlan", "Transfers", "apply_plan", "naive_bytes", "plan_files",
           "plan_migration", *_LIVE]


def __getattr__(name: str):
    if name in _LIVE:
        return getattr(importlib.import_module(f"placer.runtime.{_LIVE[name]}"), name)
    raise AttributeError(f"module 'placer.runtime' has no attribute {name!r}")
