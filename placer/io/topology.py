"""A cluster read from a file (``--topology FILE``): a G x G matrix of GB/s between ranks.

Formats: CSV (one row of the matrix per line, numbers separated by commas; blank lines and
lines starting with ``#`` are skipped) or JSON (the matrix as a list of rows, or an object
whose ``"gbps"`` entry is). The diagonal is ignored (a rank's own data does not move); every
other entry must be a positive finite number, and the matrix square, symmetric and as large as
the cluster. The NVLink domains are found from the bandwidths
(:func:`placer.types.links.domains_of`); the GPU itself (memory, FLOP/s, HBM) is ``--cluster``'s.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np

from placer.io.common import fail, require_file
from placer.presets import make_topology
from placer.types import Topology
from placer.types.links import domains_of, tier_gbps

SYMMETRY_RTOL = 1e-6
"""Relative difference at which ``m[i, j]`` and ``m[j, i]`` are the same bandwidth."""


def read_bandwidth_matrix(path: str | os.PathLike[str]) -> np.ndarray:
    """float [G, G] GB/s from a CSV or JSON file (see the module), checked; exits 2 (an
    :class:`InvalidInputError` naming ``path``) on anything else."""
    text = require_file(path).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise fail(path, "empty topology file: expected a G x G matrix of GB/s (CSV rows or JSON)")
    if text.lstrip()[:1] in "[{":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise fail(path, f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
        rows = value.get("gbps") if isinstance(value, dict) else value
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            raise fail(path, 'expected a JSON list of rows, or an object whose "gbps" is one')
    else:
        rows = [line.split(",") for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    n = len(rows)
    for i, row in enumerate(rows):
        if len(row) != n:
            raise fail(path, f"not a square matrix: row {i} has {len(row)} entries, there are {n} rows")
    try:
        m = np.array([[float(v) if not isinstance(v, bool) else float("nan") for v in row] for row in rows],
                     dtype=np.float64).reshape(n, n)
    except (TypeError, ValueError):
        raise fail(path, "every entry must be a number (GB/s)") from None
    off = ~np.eye(n, dtype=bool)
    bad = np.argwhere(off & ~(np.isfinite(m) & (m > 0)))
    if len(bad):
        i, j = bad[0]
        raise fail(path, f"entry [{i}, {j}] is {float(m[i, j])!r}: every bandwidth off the diagonal must be a "
                         "positive finite number of GB/s")
    asym = np.argwhere(~np.isclose(m, m.T, rtol=SYMMETRY_RTOL, atol=0.0) & off)
    if len(asym):
        i, j = asym[0]
        raise fail(path, f"not symmetric: [{i}, {j}] is {m[i, j]:g} GB/s but [{j}, {i}] is {m[j, i]:g}")
    return m


def read_topology(path: str | os.PathLike[str], *, cluster: str, gpus: int | None = None,
                  nodes: int | None = None, gpus_per_node: int | None = None) -> Topology:
    """The cluster of the matrix in ``path``: its domains found from the bandwidths, the GPU
    of ``cluster``; ``gpus``, ``nodes``, ``gpus_per_node`` (the flags), when given, must agree."""
    m = read_bandwidth_matrix(path)
    g = m.shape[0]
    if gpus is not None and gpus != g:
        raise fail(path, f"a {g} x {g} matrix, but --gpus is {gpus}: give one row per rank")
    domains = domains_of(m)
    if isinstance(domains, str):
        raise fail(path, f"{domains}; placer's dispatch model needs NVLink domains of consecutive ranks")
    num_nodes, per_node = domains
    for flag, given, found in (("--nodes", nodes, num_nodes), ("--gpus-per-node", gpus_per_node, per_node)):
        if given is not None and given != found:
            raise fail(path, f"its bandwidths make {num_nodes} NVLink domain(s) of {per_node} GPUs, "
                             f"but {flag} is {given}")
    base = make_topology(cluster, gpus=g, nodes=num_nodes)
    inside, across = tier_gbps(m, per_node)
    name = f"{base.name}:{os.path.basename(os.fspath(path))}"
    return replace(base, name=name, nvlink_gbps=inside, nic_gbps=across, bandwidth_gbps=tuple(map(tuple, m)))
