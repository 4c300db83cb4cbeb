"""A cluster read from a file (``--topology FILE``): a G x G matrix of GB/s between ranks; and the
GPUs' speeds (``--gpu-speed``).

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

from placer.errors import InvalidInputError
from placer.io.common import fail, require_file
from placer.presets import make_topology
from placer.types import Topology
from placer.types.links import domains_of, tier_gbps

SYMMETRY_RTOL = 1e-6
"""Relative difference at which ``m[i, j]`` and ``m[j, i]`` are the same bandwidth."""


def _csv_rows(text: str) -> list[list[str]]:
    """The comma-separated fields of each line, blank lines and ``#`` comments skipped."""
    return [line.split(",") for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


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
        rows = _csv_rows(text)
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


def read_gpu_speed(spec: str, num_gpus: int) -> tuple[float, ...]:
    """One speed factor per GPU from ``--gpu-speed SPEC``: a file (CSV numbers, one per rank, by
    line or comma; or a JSON list) or inline ``RANKS=FACTOR`` items, comma separated (``3=0.5``:
    rank 3 at half speed; ``0-7=0.8``: ranks 0 to 7; ranks not named run at 1). Exits 2 (an
    :class:`InvalidInputError` naming the file or ``--gpu-speed``) on anything else."""
    if os.path.exists(spec) or "=" not in spec:
        return _speed_file(spec, num_gpus)
    speed = [1.0] * num_gpus
    for item in filter(None, (part.strip() for part in spec.split(","))):
        ranks, _, factor = item.partition("=")
        lo, _, hi = ranks.strip().partition("-")
        try:
            first, last, value = int(lo), int(hi or lo), float(factor)
        except ValueError:
            raise InvalidInputError(f"{item!r} is not RANKS=FACTOR (e.g. 3=0.5 or 0-7=0.8)",
                                    source="--gpu-speed") from None
        if not 0 <= first <= last < num_gpus:
            raise InvalidInputError(f"ranks {ranks.strip()} outside the cluster's 0-{num_gpus - 1}",
                                    source="--gpu-speed")
        if not (np.isfinite(value) and value > 0):
            raise InvalidInputError(f"factor {factor.strip()} must be a positive number", source="--gpu-speed")
        speed[first:last + 1] = [value] * (last - first + 1)
    return tuple(speed)


def _speed_file(path: str, num_gpus: int) -> tuple[float, ...]:
    text = require_file(path).read_text(encoding="utf-8", errors="replace")
    try:
        if text.lstrip()[:1] == "[":
            values = json.loads(text)
            if not isinstance(values, list) or any(isinstance(v, (bool, list, dict, str)) for v in values):
                raise ValueError
        else:
            values = [v for row in _csv_rows(text) for v in row if v.strip()]
        speed = np.array([float(v) for v in values], dtype=np.float64)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise fail(path, "expected one speed factor per GPU: numbers (CSV) or a JSON list") from None
    if len(speed) != num_gpus:
        raise fail(path, f"{len(speed)} speed factors for {num_gpus} GPUs")
    bad = np.flatnonzero(~(np.isfinite(speed) & (speed > 0)))
    if len(bad):
        raise fail(path, f"rank {int(bad[0])}'s speed {speed[bad[0]]:g} must be a positive number")
    return tuple(float(v) for v in speed)
