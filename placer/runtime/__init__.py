"""Applying placements to a live expert-parallel deployment.

``placer.runtime.plan`` (pure numpy) turns an old and a new ``physical_to_logical [L, P]`` into
a :class:`MigrationPlan`: a relabel of the new placement that keeps the most expert weights in
place, per-slot transfers with their sources, rounds in which each rank talks to one peer, a
staging bound and a per-layer commit order. This package imports neither torch nor ray; code
that executes plans imports them itself.
"""

from placer.runtime.plan import (
    LocalCopies,
    MigrationPlan,
    Transfers,
    apply_plan,
    naive_bytes,
    plan_files,
    plan_migration,
)

__all__ = ["LocalCopies", "MigrationPlan", "Transfers", "apply_plan", "naive_bytes", "plan_files",
           "plan_migration"]
