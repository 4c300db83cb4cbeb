"""placer's own files: trace npz, stats npz and chunked Parquet traces.

Trace npz (format ``placer-npz``)
    arrays ``expert_ids`` int16 [T, L, K] and optional ``gate_weights`` float32 [T, L, K],
    ``request_ids`` int64 [T], ``phase`` int8 [T], ``home_rank`` int32 [T], plus ``header``: a
    uint8 array of UTF-8 JSON ``{"kind": "trace", "schema_version": 1, "num_experts": E,
    "order": ..., "model": ModelSpec.to_dict() | null, "synthetic": bool}``. Written whole
    (:func:`write_trace_npz`) or chunk by chunk (:func:`write_trace_npz_chunks`, the same file),
    read back chunk by chunk straight from the zip members, so memory is bounded by the chunk size.

Stats npz (format ``placer-stats``)
    for every phase present, arrays ``"{phase}/load"``, ``"{phase}/top1_transitions"``, ... (the
    array fields of :class:`~placer.types.RoutingStats` that are not None), plus the header
    ``{"kind": "stats", "schema_version": 1, "num_experts": E, "top_k": K, "phases":
    {phase: {"num_tokens": N}}, "model": ..., "synthetic": bool}``.

Parquet trace (format ``parquet``)
    one row per token. Column ``expert_ids`` is a fixed-size list of L*K int16 (the token's
    [L, K] ids, row-major); optional ``gate_weights`` (fixed-size list of L*K float32),
    ``request_ids`` int64, ``phase`` int8, ``home_rank`` int32. The JSON header (as for the trace
    npz, plus ``num_layers`` and ``top_k``) sits in the Parquet key-value metadata under key
    ``placer``. The reader yields record batches of at most the chunk size, whatever the
    row-group size of the file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from placer.errors import InvalidInputError
from placer.io.atomic import atomic_path
from placer.io.common import (
    HEADER_KEY,
    SCHEMA_VERSION,
    check_shape,
    fail,
    guard,
    header_bytes,
    json_header,
    load_arrays,
    require_file,
    resolve_model,
)
from placer.stats import merge_stats
from placer.types import PHASE_CODES, ModelSpec, RoutingStats, RoutingTrace

OPTIONAL_TOKEN_FIELDS = {"request_ids": np.int64, "phase": np.int8, "home_rank": np.int32}
STATS_ARRAYS = ("load", "top1_transitions", "pair_transitions", "coactivation", "sample_ids",
                "sample_token_index", "sample_home_rank", "sample_keys")
STATS_PHASES = ("all", *PHASE_CODES)
PARQUET_KEY = b"placer"
_PARQUET_BUFFER = 1 << 20
"""Bytes of a Parquet column chunk read at a time."""
_MAX_BATCH = 1 << 30
"""Most rows asked of one Parquet batch (Arrow takes a 64-bit count; ``sys.maxsize`` chunks are capped)."""


def _trace_header(trace: RoutingTrace, synthetic: bool) -> dict[str, Any]:
    return {"kind": "trace", "schema_version": SCHEMA_VERSION, "num_experts": trace.num_experts,
            "order": trace.order, "num_layers": trace.num_layers, "top_k": trace.top_k,
            "model": trace.model.to_dict() if trace.model is not None else None,
            "synthetic": bool(synthetic)}


def _trace_meta(path: str | os.PathLike[str], header: dict[str, Any] | None, model: ModelSpec | None,
                what: str, not_trace: str) -> tuple[dict[str, Any], ModelSpec | None, int, str]:
    """``(header, model, E, order)`` of a trace file (the error ``not_trace`` without a trace header)."""
    if header is None or header.get("kind") != "trace":
        raise fail(path, not_trace)
    with guard(path, what):
        model = resolve_model(path, model, header.get("model"))
        return header, model, int(header["num_experts"]), str(header["order"])


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def write_trace_npz(path: str | os.PathLike[str], trace: RoutingTrace, *, synthetic: bool = False) -> None:
    """Write ``trace`` as a native trace npz atomically, its members stored uncompressed (int16
    ids and float32 gate weights deflate by under a fifth, and inflating them took a third of
    ``evaluate``'s time)."""
    arrays: dict[str, np.ndarray] = {HEADER_KEY: header_bytes(_trace_header(trace, synthetic)),
                                     "expert_ids": trace.expert_ids}
    for name in ("gate_weights", *OPTIONAL_TOKEN_FIELDS):
        if getattr(trace, name) is not None:
            arrays[name] = getattr(trace, name)
    _write_npz(path, arrays, compress=False)


def write_trace_npz_chunks(path: str | os.PathLike[str], chunks: Iterable[RoutingTrace], num_tokens: int, *,
                           synthetic: bool = False) -> int:
    """Write a stream of trace chunks as one native trace npz atomically, one chunk in memory at a time.

    ``chunks``: RoutingTrace pieces [t_i, L, K] that together hold ``num_tokens`` tokens (the
    ``.npy`` headers are written first, so the total must be known); every chunk must have the
    first chunk's shape, E, order, model and optional fields. ``expert_ids`` streams straight
    into its zip member; the other arrays spool to anonymous temporary files next to ``path``
    and are copied in after it. The file is the one :func:`write_trace_npz` writes for the
    concatenated trace. Returns the token count.
    """
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise InvalidInputError("no trace chunks to write", source=str(path))
    header = _trace_header(first, synthetic)
    fields = [n for n in ("gate_weights", *OPTIONAL_TOKEN_FIELDS) if getattr(first, n) is not None]
    per_token = (first.num_layers, first.top_k)
    total = 0
    with atomic_path(path) as tmp, contextlib.ExitStack() as stack:
        spools = {n: stack.enter_context(tempfile.TemporaryFile(dir=os.path.dirname(tmp) or "."))
                  for n in fields}
        for n, f in spools.items():
            _npy_header(f, getattr(first, n).dtype, (num_tokens, *per_token) if n == "gate_weights"
                        else (num_tokens,))
        zf = stack.enter_context(zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED))
        with zf.open(f"{HEADER_KEY}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, header_bytes(header), allow_pickle=False)
        with zf.open("expert_ids.npy", "w", force_zip64=True) as member:
            _npy_header(member, first.expert_ids.dtype, (num_tokens, *per_token))
            for chunk in itertools.chain([first], it):
                present = [n for n in ("gate_weights", *OPTIONAL_TOKEN_FIELDS) if getattr(chunk, n) is not None]
                if _trace_header(chunk, synthetic) != header or present != fields:
                    raise InvalidInputError(f"chunk (L={chunk.num_layers}, K={chunk.top_k}, E={chunk.num_experts}, "
                                            f"order {chunk.order}) differs from the first chunk", source=str(path))
                total += chunk.num_tokens
                if total > num_tokens:
                    raise InvalidInputError(f"the chunks hold more than the {num_tokens:,} tokens announced",
                                            source=str(path))
                member.write(np.ascontiguousarray(chunk.expert_ids).data)
                for n, f in spools.items():
                    f.write(np.ascontiguousarray(getattr(chunk, n)).data)
        if total != num_tokens:
            raise InvalidInputError(f"the chunks hold {total:,} tokens, {num_tokens:,} announced", source=str(path))
        for n, f in spools.items():
            f.seek(0)
            with zf.open(f"{n}.npy", "w", force_zip64=True) as member:
                shutil.copyfileobj(f, member, 1 << 22)
    return total


def _npy_header(f: Any, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """The ``.npy`` header ``np.save`` writes for a C-order array of ``dtype`` and ``shape``."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(int(d) for d in shape)})


def write_stats_npz(path: str | os.PathLike[str],
                    stats_by_phase: Mapping[str, RoutingStats] | RoutingStats, *,
                    synthetic: bool = False) -> None:
    """Write statistics (one per phase, or a single one under its own phase) atomically.

    Every phase must share the shape [L, E] and top-k; the model (from the first statistics
    that carries one) goes into the header.
    """
    if isinstance(stats_by_phase, RoutingStats):
        stats_by_phase = {stats_by_phase.phase: stats_by_phase}
    if not stats_by_phase:
        raise InvalidInputError("no statistics to write", source=str(path))
    first = next(iter(stats_by_phase.values()))
    model = next((s.model for s in stats_by_phase.values() if s.model is not None), None)
    arrays: dict[str, np.ndarray] = {}
    phases: dict[str, dict[str, int]] = {}
    for phase, s in stats_by_phase.items():
        if phase not in STATS_PHASES:
            raise InvalidInputError(f"unknown phase {phase!r}; phases are {', '.join(STATS_PHASES)}",
                                    source=str(path))
        if s.load.shape != first.load.shape or s.top_k != first.top_k:
            raise InvalidInputError(f"phase {phase!r} has shape {list(s.load.shape)} (top_k={s.top_k}), "
                                    f"others {list(first.load.shape)} (top_k={first.top_k})",
                                    source=str(path))
        phases[phase] = {"num_tokens": int(s.num_tokens)}
        for name in STATS_ARRAYS:
            value = getattr(s, name)
            if value is not None:
                arrays[f"{phase}/{name}"] = value
    header = {"kind": "stats", "schema_version": SCHEMA_VERSION, "num_experts": first.num_experts,
              "num_layers": first.num_layers, "top_k": first.top_k, "phases": phases,
              "model": model.to_dict() if model is not None else None, "synthetic": bool(synthetic)}
    arrays[HEADER_KEY] = header_bytes(header)
    _write_npz(path, arrays)


def _write_npz(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], compress: bool = True) -> None:
    """An npz (zip of .npy members) written atomically, deflated at level 1 (statistics: counts
    compress well), or stored (``compress=False``: traces). Readable by ``np.load``."""
    method, level = (zipfile.ZIP_DEFLATED, 1) if compress else (zipfile.ZIP_STORED, None)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=method, compresslevel=level) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)


def npz_header(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The placer header of an npz file, or None when it has none."""
    require_file(path)
    with guard(path, "npz file"), load_arrays(path) as z:
        if HEADER_KEY not in z.files:
            return None
        return json_header(path, z[HEADER_KEY])


class _NpyStream:
    """Read the rows of one C-order array member of a zip, a few rows at a time."""

    def __init__(self, zf: zipfile.ZipFile, name: str):
        self.name = name
        self.f = zf.open(name)
        version = np.lib.format.read_magic(self.f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(self.f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(self.f)
        if dtype.hasobject:
            raise ValueError(f"array {name!r} holds Python objects (not loaded: no pickles)")
        if fortran and len(shape) > 1:
            raise ValueError(f"array {name!r} is Fortran-ordered; placer writes C order")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.done = 0

    def read(self, rows: int) -> np.ndarray:
        rows = min(rows, self.shape[0] - self.done)
        data = self.f.read(rows * self.row_bytes)
        if len(data) != rows * self.row_bytes:
            raise ValueError(f"array {self.name!r} is truncated")
        self.done += rows
        return np.frombuffer(data, dtype=self.dtype).reshape((rows, *self.shape[1:]))

    def close(self) -> None:
        self.f.close()


def read_trace_npz(path: str | os.PathLike[str], *, model: ModelSpec | None = None,
                   chunk_tokens: int = 65536, gate_weights: bool = True
                   ) -> tuple[Callable[[], Iterator[RoutingTrace]], ModelSpec | None, bool]:
    """Open a native trace npz: ``(chunks, model, synthetic)``.

    The header and the array shapes are checked now; ``chunks()`` streams [chunk_tokens, L, K]
    pieces from the zip members. ``gate_weights=False`` leaves the gate weights of a
    sorted-order trace unread (they order nothing there; two thirds of the bytes).
    """
    header, model, e, order = _trace_meta(path, npz_header(path), model, "trace npz",
                                          "not a placer trace npz (no trace header)")
    with guard(path, "trace npz"):
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "expert_ids.npy" not in names:
                raise fail(path, "trace npz has no 'expert_ids' array")
            ids = _NpyStream(zf, "expert_ids.npy")
            ids.close()
            shape = ids.shape
            if len(shape) != 3:
                raise fail(path, f"expert_ids has shape {list(shape)}, expected [tokens, layers, top_k]")
            optional = [n for n in ("gate_weights", *OPTIONAL_TOKEN_FIELDS) if f"{n}.npy" in names]
            for n in optional:
                s = _NpyStream(zf, f"{n}.npy")
                s.close()
                want = shape if n == "gate_weights" else shape[:1]
                if s.shape != want:
                    raise fail(path, f"{n} has shape {list(s.shape)}, expected {list(want)}")
        check_shape(path, model, shape[1], e, shape[2])
    if not gate_weights and order == "sorted":
        optional = [n for n in optional if n != "gate_weights"]

    def chunks() -> Iterator[RoutingTrace]:
        with guard(path, "trace npz"), zipfile.ZipFile(path) as zf:
            streams = {n: _NpyStream(zf, f"{n}.npy") for n in ("expert_ids", *optional)}
            try:
                for _ in range(0, max(shape[0], 1), chunk_tokens):
                    parts = {n: s.read(chunk_tokens) for n, s in streams.items()}
                    ids = parts.pop("expert_ids")
                    yield RoutingTrace(ids, e, order, model=model, **parts)
            finally:
                for s in streams.values():
                    s.close()
    return chunks, model, bool(header.get("synthetic", False))


def read_stats_npz(path: str | os.PathLike[str], phase: str = "all", *,
                   model: ModelSpec | None = None) -> RoutingStats:
    """The statistics of ``phase`` from a native stats npz.

    ``"all"`` returns the stored "all" statistics when present, else merges every stored
    phase (:func:`~placer.stats.merge_stats`). Another phase must be stored.
    """
    stats, _ = stats_npz_input(path, phase, model)
    return stats


def stats_npz_input(path: str | os.PathLike[str], phase: str, model: ModelSpec | None) -> tuple[RoutingStats, bool]:
    header = npz_header(path)
    if header is None or header.get("kind") != "stats":
        raise fail(path, "not a placer stats npz (no stats header)")
    with guard(path, "stats npz"):
        model = resolve_model(path, model, header.get("model"))
        phases = header["phases"]
        if not isinstance(phases, dict) or not phases:
            raise fail(path, "stats header lists no phases")
        if phase not in STATS_PHASES:
            raise fail(path, f"unknown phase {phase!r}; phases are {', '.join(STATS_PHASES)}")
        if phase != "all" and phase not in phases:
            raise fail(path, f"phase {phase!r} is absent; the file holds: {', '.join(phases)}")
        wanted = [phase] if phase in phases else list(phases)
        out = []
        with load_arrays(path) as z:
            for p in wanted:
                fields = {n: z[f"{p}/{n}"] for n in STATS_ARRAYS if f"{p}/{n}" in z.files}
                if "load" not in fields:
                    raise fail(path, f"phase {p!r} has no load array")
                out.append(RoutingStats(num_tokens=int(phases[p]["num_tokens"]), top_k=int(header["top_k"]),
                                        phase=p, model=model, **fields))
        stats = out[0] if len(out) == 1 else merge_stats(out)
        if stats.phase != phase:
            stats = replace(stats, phase=phase)
        check_shape(path, model, stats.num_layers, stats.num_experts, stats.top_k)
        return replace(stats, model=model), bool(header.get("synthetic", False))


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


def _chunk_table(trace: RoutingTrace, header: dict[str, Any]) -> Any:
    import pyarrow as pa  # deferred: 0.1-0.3 s to import; only Parquet files need it

    t, width = trace.num_tokens, trace.num_layers * trace.top_k
    cols = {"expert_ids": pa.FixedSizeListArray.from_arrays(
        pa.array(trace.expert_ids.reshape(-1), type=pa.int16()), width)}
    if trace.gate_weights is not None:
        cols["gate_weights"] = pa.FixedSizeListArray.from_arrays(
            pa.array(trace.gate_weights.reshape(-1), type=pa.float32()), width)
    for name in OPTIONAL_TOKEN_FIELDS:
        value = getattr(trace, name)
        if value is not None:
            cols[name] = pa.array(value)
    table = pa.table(cols)
    assert table.num_rows == t
    return table.replace_schema_metadata({PARQUET_KEY: json.dumps(header, sort_keys=True).encode()})


def write_trace_parquet(path: str | os.PathLike[str], chunks: Iterable[RoutingTrace], *,
                        row_group_tokens: int = 65536, synthetic: bool = False) -> int:
    """Write a stream of trace chunks as one Parquet file atomically; returns the token count.

    Every chunk must have the first chunk's shape, E, order, model and optional columns.
    Row groups hold at most ``row_group_tokens`` tokens (a chunk never shares a row group).
    """
    import pyarrow.parquet as pq  # deferred: 0.1-0.3 s to import; only Parquet files need it

    if isinstance(chunks, RoutingTrace):
        chunks = [chunks]
    if row_group_tokens < 1:
        raise InvalidInputError("row_group_tokens must be positive", source=str(path))
    total = 0
    with atomic_path(path) as tmp:
        writer = None
        header: dict[str, Any] | None = None
        try:
            for chunk in chunks:
                h = _trace_header(chunk, synthetic)
                table = _chunk_table(chunk, h)
                if writer is None:
                    header = h
                    writer = pq.ParquetWriter(tmp, table.schema)
                elif h != header or not table.schema.equals(writer.schema, check_metadata=False):
                    raise InvalidInputError(
                        f"chunk (L={chunk.num_layers}, K={chunk.top_k}, E={chunk.num_experts}, "
                        f"columns {table.column_names}) differs from the first chunk", source=str(path))
                if chunk.num_tokens:
                    writer.write_table(table.replace_schema_metadata(writer.schema.metadata),
                                       row_group_size=row_group_tokens)
                total += chunk.num_tokens
            if writer is None:
                raise InvalidInputError("no trace chunks to write", source=str(path))
        finally:
            if writer is not None:
                writer.close()
    return total


def parquet_header(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    import pyarrow.parquet as pq  # deferred: 0.1-0.3 s to import; only Parquet files need it

    require_file(path)
    with guard(path, "Parquet file"):
        meta = pq.read_schema(str(path)).metadata or {}
        if PARQUET_KEY not in meta:
            return None
        return json_header(path, meta[PARQUET_KEY])


def read_trace_parquet(path: str | os.PathLike[str], *, model: ModelSpec | None = None,
                       chunk_tokens: int = 65536, gate_weights: bool = True
                       ) -> tuple[Callable[[], Iterator[RoutingTrace]], ModelSpec | None, bool]:
    """Open a Parquet trace: ``(chunks, model, synthetic)``.

    ``chunks()`` yields each row group as record batches of at most ``chunk_tokens`` tokens
    (one batch when the group is smaller): a file written as one huge row group is still read
    a batch at a time, through a small read buffer, never a row group or a column chunk whole.
    ``gate_weights=False`` leaves the gate weights of a sorted-order trace unread.
    """
    import pyarrow.parquet as pq  # deferred: 0.1-0.3 s to import; only Parquet files need it

    header, model, e, order = _trace_meta(path, parquet_header(path), model, "Parquet trace",
                                          "not a placer Parquet trace (no 'placer' metadata)")
    with guard(path, "Parquet trace"):
        num_layers, top_k = int(header["num_layers"]), int(header["top_k"])
        check_shape(path, model, num_layers, e, top_k)
        names = pq.read_schema(str(path)).names
        if "expert_ids" not in names:
            raise fail(path, "Parquet trace has no 'expert_ids' column")
    columns = [n for n in names if gate_weights or order != "sorted" or n != "gate_weights"]

    def chunks() -> Iterator[RoutingTrace]:
        import pyarrow as pa  # deferred: 0.1-0.3 s to import; only Parquet files need it

        with guard(path, "Parquet trace"):
            # buffer_size > 0: column chunks are read through a buffer of that size, not whole.
            pf = pq.ParquetFile(str(path), buffer_size=_PARQUET_BUFFER, pre_buffer=False)
            try:
                for i in range(pf.num_row_groups):
                    for batch in pf.iter_batches(batch_size=min(chunk_tokens, _MAX_BATCH), row_groups=[i],
                                                 columns=columns, use_threads=False):
                        yield _table_trace(path, pa.Table.from_batches([batch]), num_layers, top_k, e, order,
                                           model)
            finally:
                pf.close()
    return chunks, model, bool(header.get("synthetic", False))


def _table_trace(path: str | os.PathLike[str], table: Any, num_layers: int, top_k: int, e: int,
                 order: str, model: ModelSpec | None) -> RoutingTrace:
    t = table.num_rows

    def grid(name: str, dtype: type) -> np.ndarray:
        col = table.column(name).combine_chunks()
        if col.null_count:
            raise fail(path, f"column {name!r} has missing values")
        values = col.flatten().to_numpy(zero_copy_only=False)
        if values.size != t * num_layers * top_k:
            raise fail(path, f"column {name!r} holds {values.size} values for {t} tokens x "
                             f"{num_layers} layers x top-{top_k}")
        return values.astype(dtype).reshape(t, num_layers, top_k)

    kwargs: dict[str, Any] = {}
    if "gate_weights" in table.column_names:
        kwargs["gate_weights"] = grid("gate_weights", np.float32)
    for name, dtype in OPTIONAL_TOKEN_FIELDS.items():
        if name in table.column_names:
            col = table.column(name)
            if col.null_count:
                raise fail(path, f"column {name!r} has missing values")
            kwargs[name] = col.to_numpy().astype(dtype)
    return RoutingTrace(grid("expert_ids", np.int16), e, order, model=model, **kwargs)
