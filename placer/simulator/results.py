"""Write and read the simulator's results directory (layout: ``docs/simulator-results.md``).

A results directory holds ``metrics.json`` (schema ``placer-sim-results/1``: the inputs'
identities and one summary per placement) and five CSV tables, each with a ``placement`` column
first. :func:`write_results` writes it atomically file by file (CSVs first, ``metrics.json``
last); :func:`read_results` reads it back into a :class:`SimResults`, with the declared dtypes,
and turns every missing, truncated or foreign file into one
:class:`~placer.errors.InvalidInputError` naming that file.

Example::

    write_results("out", inputs, [RunOutput("eplb", summary, tables), ...])
    res = read_results("out")
    res.labels                      # ["eplb", ...], in the order written
    res.rows("layers", "eplb")      # that placement's rows, without the placement column
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from placer import __version__
from placer.display import json_value
from placer.errors import InvalidInputError
from placer.io.atomic import atomic_path, atomic_write_text
from placer.io.common import guard, require_file

SCHEMA = "placer-sim-results/1"
METRICS_FILE = "metrics.json"

_I, _F, _S = "int64", "float64", "str"

TABLES: dict[str, dict[str, str]] = {
    "iterations": {"iteration": _I, "start_s": _F, "duration_s": _F, "tokens": _I,
                   "prefill_tokens": _I, "decode_tokens": _I, "attention_s": _F,
                   "dispatch_s": _F, "compute_s": _F, "combine_s": _F, "other_s": _F},
    "layers": {"layer": _I, "dispatch_s": _F, "compute_s": _F, "combine_s": _F,
               "attention_s": _F, "dispatch_p99_s": _F, "combine_p99_s": _F,
               "straggler_rank": _I, "straggler_share": _F},
    "requests": {"request": _I, "rank": _I, "arrival_s": _F, "prompt_tokens": _I,
                 "output_tokens": _I, "first_token_s": _F, "finish_s": _F, "ttft_s": _F,
                 "tpot_s": _F, "e2e_s": _F},
    "gpu_load": {"layer": _I, "gpu": _I, "pairs": _F},
    "links": {"src": _I, "dst": _I, "kind": _S, "bytes": _F, "busy_s": _F, "utilisation": _F},
}
"""Table name -> {column: dtype}, in file column order, without the leading ``placement``."""

OPTIONAL_COLUMNS: dict[str, dict[str, str]] = {"layers": {"a2a_hidden_s": _F}}
"""Columns a table carries after those of :data:`TABLES` only when the run produced them (in this
order): ``layers.a2a_hidden_s`` with two-batch overlap."""

KEYS: dict[str, tuple[str, ...]] = {
    "iterations": ("iteration",), "layers": ("layer",), "requests": ("request",),
    "gpu_load": ("layer", "gpu"), "links": ("src", "dst", "kind"),
}
"""Columns that identify a row of each table within one placement (no duplicates allowed)."""

LINK_KINDS = ("nvlink", "rdma")

SUMMARY_KEYS: tuple[str, ...] = (
    "iterations", "simulated_s", "tokens", "throughput_tok_s", "output_tok_s",
    "requests", "requests_finished",
    "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "tpot_p90_s", "tpot_p99_s",
    "e2e_p50_s", "e2e_p90_s", "e2e_p99_s",
    "iteration_p50_s", "iteration_p90_s", "iteration_p99_s",
    "a2a_p50_s", "a2a_p90_s", "a2a_p99_s",
    "dispatch_s", "compute_s", "combine_s", "attention_s", "other_s",
    "straggler_rank", "straggler_share", "max_link_utilisation", "nvlink_bytes", "rdma_bytes",
)
"""Keys every placement summary carries (values may be null); extra keys are kept after them."""

INPUT_KEYS = ("model", "topology", "routing", "placements", "workload", "config")
"""Keys of ``metrics.json["inputs"]``; ``inputs["placements"]`` is keyed by the run labels."""


@dataclass
class RunOutput:
    """One simulated placement: its label, summary metrics and tables (no ``placement`` column).

    ``tables`` maps every name of :data:`TABLES` to a DataFrame with exactly that table's
    columns (any order; ``requests`` may be empty, as in replay).
    """

    label: str
    summary: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass
class SimResults:
    """A results directory read back: inputs, one summary per label, the concatenated tables."""

    inputs: dict[str, Any]
    summaries: dict[str, dict[str, Any]]
    tables: dict[str, pd.DataFrame]
    labels: list[str]

    def rows(self, table: str, label: str) -> pd.DataFrame:
        """The rows of ``table`` for placement ``label``, without the placement column."""
        df = self.tables[table]
        return df.loc[df["placement"] == label].drop(columns="placement").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def sha256_of(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file at ``path`` (read in 1 MiB chunks)."""
    require_file(path)
    digest = hashlib.sha256()
    with guard(path), open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_inputs(inputs: Any, labels: Sequence[str], source: str) -> None:
    if not isinstance(inputs, Mapping):
        raise InvalidInputError("inputs is not a JSON object", source=source)
    missing = [k for k in INPUT_KEYS if k not in inputs]
    if missing:
        raise InvalidInputError(f"inputs lack {', '.join(missing)}", source=source)
    placements = inputs["placements"]
    if not isinstance(placements, Mapping) or set(placements) != set(labels):
        have = sorted(placements) if isinstance(placements, Mapping) else placements
        raise InvalidInputError(f"inputs.placements is keyed {have!r}, expected the labels "
                                f"{list(labels)!r}", source=source)


def _ordered(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``summary`` with :data:`SUMMARY_KEYS` first, then its other keys in their order."""
    return {**{k: summary[k] for k in SUMMARY_KEYS}, **summary}


def _check_summary(summary: Any, label: str, source: str) -> None:
    if not isinstance(summary, Mapping):
        raise InvalidInputError(f"summary of placement {label!r} is not a JSON object",
                                source=source)
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise InvalidInputError(f"summary of placement {label!r} lacks {', '.join(missing)}",
                                source=source)


def table_columns(name: str, present: Any = ()) -> dict[str, str]:
    """The columns of table ``name`` (column -> dtype, in file order): those of :data:`TABLES`, then
    the :data:`OPTIONAL_COLUMNS` among ``present`` (column names)."""
    optional = OPTIONAL_COLUMNS.get(name, {})
    return {**TABLES[name], **{c: t for c, t in optional.items() if c in set(present)}}


def _coerce(name: str, df: pd.DataFrame, source: str) -> pd.DataFrame:
    """``df`` (columns already checked) with the declared dtypes and a fresh RangeIndex.

    Checks that integer columns hold integers, link kinds are known and no two rows share the
    :data:`KEYS` (plus ``placement`` when ``df`` has that column, which is kept first).
    """
    out: dict[str, Any] = {}
    columns = table_columns(name, df.columns)
    for col, dtype in columns.items():
        values = df[col].reset_index(drop=True)
        if dtype == _S:
            out[col] = values.astype(str)
            continue
        try:
            arr = pd.to_numeric(values, errors="raise").to_numpy(dtype=np.float64, na_value=np.nan)
        except (ValueError, TypeError):
            raise InvalidInputError(f"{name} column {col!r} is not numeric", source=source) from None
        if dtype == _F:
            out[col] = pd.Series(arr, dtype=np.float64)
        elif not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
            raise InvalidInputError(f"{name} column {col!r} holds non-integer or missing values",
                                    source=source)
        elif values.dtype.kind in "iu":
            out[col] = values.astype(np.int64)
        else:
            out[col] = pd.Series(arr.astype(np.int64))
    result = pd.DataFrame(out, columns=list(columns))
    keys = [*(["placement"] if "placement" in df else []), *KEYS[name]]
    if "placement" in df:
        result.insert(0, "placement", df["placement"].reset_index(drop=True).astype(str))
    duplicated = result.duplicated(subset=keys)
    if duplicated.any():
        row = result.loc[duplicated.idxmax(), keys].tolist()
        raise InvalidInputError(f"{name} has more than one row for {dict(zip(keys, row, strict=True))}",
                                source=source)
    if name == "links":
        bad = sorted(set(result["kind"]) - set(LINK_KINDS))
        if bad:
            raise InvalidInputError(f"links kind {bad[0]!r} is not one of {', '.join(LINK_KINDS)}",
                                    source=source)
    return result


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------

def write_results(directory: str | os.PathLike[str], inputs: dict[str, Any],
                  runs: Sequence[RunOutput]) -> None:
    """Write ``runs`` (one per placement, in order) and ``inputs`` as a results directory.

    Creates ``directory`` (and parents) if needed and overwrites the files of an older result.
    Each file is written atomically; ``metrics.json`` is written last. Labels must be unique,
    non-empty strings; every summary must carry :data:`SUMMARY_KEYS`; every table exactly the
    columns of :data:`TABLES`. Bad runs or inputs raise :class:`InvalidInputError`.
    """
    directory = Path(directory)
    source = str(directory)
    labels = [run.label for run in runs]
    if not runs:
        raise InvalidInputError("no placement runs to write", source=source)
    for label in labels:
        if not isinstance(label, str) or not label:
            raise InvalidInputError(f"placement label {label!r} is not a non-empty string",
                                    source=source)
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise InvalidInputError(f"placement label {duplicates[0]!r} appears more than once",
                                source=source)
    _check_inputs(inputs, labels, source)
    frames: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    for run in runs:
        _check_summary(run.summary, run.label, source)
        for name in TABLES:
            where = f"{source} (placement {run.label!r}, table {name})"
            df = run.tables.get(name)
            if not isinstance(df, pd.DataFrame):
                raise InvalidInputError("table is missing", source=where)
            have, want = list(df.columns), list(table_columns(name, df.columns))
            if sorted(map(str, have)) != sorted(want):
                raise InvalidInputError(f"columns {have} differ from {want}", source=where)
            df = _coerce(name, df, where)
            df.insert(0, "placement", pd.Series([run.label] * len(df), dtype=str))
            frames[name].append(df)
    try:
        metrics = {"schema": SCHEMA, "placer_version": __version__,
                   "inputs": json_value(inputs),
                   "placements": {run.label: json_value(_ordered(run.summary)) for run in runs}}
    except TypeError as exc:
        raise InvalidInputError(f"cannot write {METRICS_FILE}: {exc}", source=source) from None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot create the directory: {exc.strerror or exc}",
                                source=source) from None
    for name, parts in frames.items():
        table = pd.concat(parts, ignore_index=True)  # a run without an optional column: NaN there
        with atomic_path(directory / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False, lineterminator="\n")
    atomic_write_text(directory / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------

def read_results(directory: str | os.PathLike[str]) -> SimResults:
    """Read a results directory written by :func:`write_results`.

    Raises :class:`InvalidInputError` naming the directory or the offending file when the
    directory or a file is missing, empty, truncated, of another schema, has other columns, or
    names placements that ``metrics.json`` does not list.
    """
    directory = Path(directory)
    if not directory.exists():
        raise InvalidInputError("results directory not found", source=str(directory))
    if not directory.is_dir():
        raise InvalidInputError("is not a results directory", source=str(directory))
    metrics_path = directory / METRICS_FILE
    require_file(metrics_path)
    with guard(metrics_path, "JSON file"), open(metrics_path, encoding="utf-8") as f:
        metrics = json.load(f)
    source = str(metrics_path)
    if not isinstance(metrics, dict) or "schema" not in metrics:
        raise InvalidInputError(f"not a simulator results file (no schema; expected {SCHEMA!r})",
                                source=source)
    if metrics["schema"] != SCHEMA:
        raise InvalidInputError(f"schema {metrics['schema']!r} is not {SCHEMA!r}", source=source)
    summaries = metrics.get("placements")
    if not isinstance(summaries, dict) or not summaries:
        raise InvalidInputError("placements is missing or empty", source=source)
    labels = list(summaries)
    for label, summary in summaries.items():
        _check_summary(summary, label, source)
    _check_inputs(metrics.get("inputs"), labels, source)
    tables = {name: _read_table(directory / f"{name}.csv", name, labels) for name in TABLES}
    return SimResults(inputs=metrics["inputs"], summaries=summaries, tables=tables, labels=labels)


def _read_table(path: Path, name: str, labels: list[str]) -> pd.DataFrame:
    require_file(path)
    with guard(path, "CSV file"), open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            raise InvalidInputError("truncated CSV file (no newline after the last row)",
                                    source=str(path))
    columns = {**TABLES[name], **OPTIONAL_COLUMNS.get(name, {})}
    floats = [c for c, t in columns.items() if t == _F]
    with guard(path, "CSV file"):
        df = pd.read_csv(path, dtype={"placement": str, **columns}, keep_default_na=False,
                         na_values={c: [""] for c in floats})
    expected = ["placement", *table_columns(name, df.columns)]
    if list(df.columns) != expected:
        raise InvalidInputError(f"columns {list(df.columns)} differ from {expected}",
                                source=str(path))
    unknown = sorted(set(df["placement"]) - set(labels))
    if unknown:
        raise InvalidInputError(f"placement {unknown[0]!r} is not listed in {METRICS_FILE}",
                                source=str(path))
    return _coerce(name, df, str(path))
