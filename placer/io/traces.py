"""Reading routing inputs of every supported format: detection, then one uniform result.

Formats (``FORMATS``), detected from the extension and the content:

============================  ===========  ==================================================
name                          extension    content
============================  ===========  ==================================================
``placer-npz``                .npz         native trace (header ``kind: trace``)
``placer-stats``              .npz         native statistics (header ``kind: stats``)
``parquet``                   .parquet     native chunked trace (metadata key ``placer``)
``hdmoe-json``                .json        ``{"0": [[e1, e2], ...], ...}``
``sglang-stat``               .pt          SGLang recorder ``stat`` dump (counts)
``sglang-per-pass``           .pt          SGLang recorder ``per_pass`` dump (counts)
``sglang-per-token``          .pt          SGLang recorder ``per_token`` dump (trace)
``sglang-csv``                .csv         legacy ``layer_id,expert_id,count``
``r3-npy``                    .npy         R3 int [tokens, hidden layers, top_k]
``r3-base64``                 .txt, .b64   R3 base64 of little-endian int32 (needs a model)
``megatron-jsonl``            .jsonl       Megatron ``router_trace_rank{r}.jsonl``
``load-csv``                  .csv         load matrix [L, E] (counts)
``load-npz``                  .npz         load matrix [L, E] (counts)
``trtllm-stats``              directory    TensorRT-LLM expert statistics: ``meta_info.json``
                                           + ``rank{r}.safetensors`` (counts); the directory
                                           or its ``meta_info.json``
============================  ===========  ==================================================

Count-only formats give ``RoutingInput(kind="stats")``, the others ``kind="trace"``. The native
writers (:mod:`placer.io.native`) are re-exported here.
"""

from __future__ import annotations

import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from placer.errors import InvalidInputError
from placer.io import external, native, r3, sglang, trtllm_stats
from placer.io.common import chunker, fail, guard, load_arrays, load_torch, require_file
from placer.io.native import (
    read_stats_npz,
    write_stats_npz,
    write_trace_npz,
    write_trace_npz_chunks,
    write_trace_parquet,
)
from placer.types import ModelSpec, RoutingStats, RoutingTrace

__all__ = ["FORMATS", "STATS_FORMATS", "TRACE_FORMATS", "RoutingInput", "concat_traces", "detect_format",
           "read_input", "read_stats_npz", "read_trace", "write_stats_npz", "write_trace_npz",
           "write_trace_npz_chunks", "write_trace_parquet"]

TRACE_FORMATS = ("placer-npz", "parquet", "hdmoe-json", "sglang-per-token", "r3-npy", "r3-base64",
                 "megatron-jsonl")
STATS_FORMATS = ("placer-stats", "sglang-stat", "sglang-per-pass", "sglang-csv", "load-csv", "load-npz",
                 "trtllm-stats")
FORMATS = ("placer-npz", "placer-stats", "parquet", "hdmoe-json", "sglang-stat", "sglang-per-pass",
           "sglang-per-token", "sglang-csv", "r3-npy", "r3-base64", "megatron-jsonl", "load-csv",
           "load-npz", "trtllm-stats")
_SUPPORTED = ("supported: placer .npz/.parquet, HD-MoE .json, SGLang .pt (stat, per_pass, "
              "per_token) and legacy .csv, R3 .npy/.txt/.b64, Megatron .jsonl, load matrix .csv/.npz, "
              "TensorRT-LLM expert-statistic directory (meta_info.json + rank*.safetensors)")


@dataclass(frozen=True)
class RoutingInput:
    """One routing input, read.

    Attributes
    ----------
    kind : "trace" | "stats"
        Per-token routing, or counts only.
    chunks : callable returning an iterator of RoutingTrace, or None
        For traces: each call streams the trace again as chunks [<=chunk_tokens, L, K]
        (native npz, Parquet, R3 .npy and base64, SGLang per_token dumps are read chunk by
        chunk from disk; the other formats are read whole, then sliced).
    stats : RoutingStats or None
        For count-only inputs.
    model : ModelSpec or None
        The file header's model or the caller's (they never contradict).
    format : str
        One of ``FORMATS``.
    source : str
        The path.
    synthetic : bool
        The native header marks the data as generated, not measured.
    """

    kind: str
    chunks: Callable[[], Iterator[RoutingTrace]] | None
    stats: RoutingStats | None
    model: ModelSpec | None
    format: str
    source: str
    synthetic: bool = False


def _unknown(path: str | os.PathLike[str], what: str) -> InvalidInputError:
    return fail(path, f"unknown routing input format ({what}); {_SUPPORTED}")


def _head(path: str | os.PathLike[str], n: int = 4096) -> bytes:
    with guard(path), open(path, "rb") as f:
        return f.read(n)


def _detect_npz(path: str | os.PathLike[str]) -> str:
    with guard(path, "npz file"):
        if not zipfile.is_zipfile(path):
            raise fail(path, "not a valid npz (zip) file: truncated or corrupt")
        header = native.npz_header(path)
        if header is not None:
            kind = header.get("kind")
            if kind == "trace":
                return "placer-npz"
            if kind == "stats":
                return "placer-stats"
            raise fail(path, f"placer npz header has unknown kind {kind!r}")
        with load_arrays(path) as z:
            names = list(z.files)
        if external.load_npz_key(path, names) is not None:
            return "load-npz"
        raise _unknown(path, f"npz with arrays {sorted(names)}")


_HDMOE = re.compile(rb'^\s*\{\s*"\s*-?\d+\s*"\s*:\s*\[')
_BASE64 = re.compile(rb"^[A-Za-z0-9+/=\s]+$")


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format of a routing input (one of ``FORMATS``), from its extension and content.

    A directory is a routing input only as TensorRT-LLM expert statistics (``meta_info.json`` or
    ``rank{r}.safetensors`` in it), as is a file named ``meta_info.json``.
    """
    if Path(path).is_dir():
        if trtllm_stats.is_stats_dir(path):
            return "trtllm-stats"
        raise fail(path, "is a directory, not a file (the only directory input is TensorRT-LLM "
                         "expert statistics: meta_info.json + rank*.safetensors)")
    require_file(path)
    if Path(path).name == trtllm_stats.META_FILE:
        return "trtllm-stats"
    ext = Path(path).suffix.lower()
    if ext == ".npz":
        return _detect_npz(path)
    if ext in (".parquet", ".pq"):
        if _head(path, 4) != b"PAR1":
            raise fail(path, "not a Parquet file (bad magic bytes)")
        return "parquet"
    if ext in (".pt", ".pth"):
        kind = sglang.pt_kind(path, sglang.load_pt_meta(path))
        if kind is None:
            raise _unknown(path, "a .pt file that is not an SGLang recorder dump")
        return kind
    if ext == ".json":
        head = _head(path)
        if _HDMOE.match(head):
            return "hdmoe-json"
        if b"physical_to_logical_map" in head:
            raise fail(path, "this is a placement file, not a routing input")
        raise _unknown(path, "JSON that is not an HD-MoE {layer: [[ids]]} object")
    if ext == ".jsonl":
        head = _head(path, 1 << 16)
        if b'"top_indices"' in head:
            return "megatron-jsonl"
        raise _unknown(path, "JSONL without Megatron 'top_indices' records")
    if ext == ".csv":
        first = _head(path, 1024).decode("utf-8", errors="replace").lstrip("\ufeff").splitlines()
        if first and first[0].replace(" ", "").lower() == "layer_id,expert_id,count":
            return "sglang-csv"
        return "load-csv"
    if ext == ".npy":
        return "r3-npy"
    if ext in (".txt", ".b64"):
        if _BASE64.match(_head(path)):
            return "r3-base64"
        raise _unknown(path, "text that is not base64")
    raise _unknown(path, f"extension {ext or '(none)'!r}")


def read_input(path: str | os.PathLike[str], *, model: ModelSpec | None = None,
               format: str | None = None, chunk_tokens: int = 65536,
               num_gpus: int | None = None, gate_weights: bool = True) -> RoutingInput:
    """Read one routing input of any supported format.

    Parameters
    ----------
    path : the file (or a TensorRT-LLM expert-statistic directory).
    model : when given, shapes and ids are checked against it (layers, E, top-k), dense
        layers are dropped through ``model.moe_layer_ids`` and traces carry it. A model in the
        file header must agree with it.
    format : one of ``FORMATS``; detected when None.
    chunk_tokens : tokens per chunk of ``chunks()``.
    num_gpus : when given, home ranks recorded in a native trace must be below it (checked
        as chunks stream).
    gate_weights : False leaves the gate weights of a sorted-order native trace (npz, Parquet)
        unread: enough for statistics and metrics, a third of the bytes to read.

    Raises
    ------
    InvalidInputError naming the path for any bad input; MissingDependencyError when a .pt
    needs torch. R3 and SGLang per_token inputs are checked whole here (one bounded pass).
    What only a chunk shows (the ids of native npz and Parquet traces; a token picking one
    expert twice, in any format) is checked as ``chunks()`` streams, raising the same error.
    """
    source = str(path)
    if chunk_tokens < 1:
        raise fail(path, f"chunk_tokens must be positive, got {chunk_tokens}")
    if format is not None and format not in FORMATS:
        raise fail(path, f"unknown format {format!r}; formats: {', '.join(FORMATS)}")
    if format is None and Path(path).is_dir():
        format = detect_format(path)
    if format == "trtllm-stats" and Path(path).is_dir():  # the one directory input
        stats = trtllm_stats.read_trtllm_stats(path, model)
        return RoutingInput("stats", None, stats, stats.model, format, source)
    require_file(path)
    obj: Any = None  # a .pt dump's structure, its tensors on the meta device (no data read)
    if format is None:
        ext = Path(path).suffix.lower()
        if ext in (".pt", ".pth"):
            obj = sglang.load_pt_meta(path)  # loaded once: detect from it and read it
            format = sglang.pt_kind(path, obj)
            if format is None:
                raise _unknown(path, "a .pt file that is not an SGLang recorder dump")
        else:
            format = detect_format(path)
    elif format in sglang.PT_FORMATS:
        obj = sglang.load_pt_meta(path)
        if sglang.pt_kind(path, obj) != format:
            raise fail(path, f"not an SGLang {format[len('sglang-'):]} dump")

    def stats_input(stats: RoutingStats, synthetic: bool = False) -> RoutingInput:
        return RoutingInput("stats", None, stats, stats.model, format, source, synthetic)

    def trace_input(chunks: Callable[[], Iterator[RoutingTrace]], m: ModelSpec | None,
                    synthetic: bool = False) -> RoutingInput:
        return RoutingInput("trace", _checked(path, chunks, num_gpus), None, m, format, source, synthetic)

    if format == "placer-npz":
        chunks, m, synthetic = native.read_trace_npz(path, model=model, chunk_tokens=chunk_tokens,
                                                     gate_weights=gate_weights)
        return trace_input(chunks, m, synthetic)
    if format == "parquet":
        chunks, m, synthetic = native.read_trace_parquet(path, model=model, chunk_tokens=chunk_tokens,
                                                         gate_weights=gate_weights)
        return trace_input(chunks, m, synthetic)
    if format == "placer-stats":
        stats, synthetic = native.stats_npz_input(path, "all", model)
        return stats_input(stats, synthetic)
    streamed: dict[str, Callable[[], Callable[[], Iterator[RoutingTrace]]]] = {
        "r3-npy": lambda: r3.read_r3_npy(path, model, chunk_tokens),
        "r3-base64": lambda: r3.read_r3_base64(path, model, chunk_tokens),
        "sglang-per-token": lambda: sglang.read_sglang_per_token(path, obj, model, chunk_tokens),
    }
    if format in streamed:  # read from the file chunk by chunk, checked whole when opened
        return trace_input(streamed[format](), model)
    readers: dict[str, Callable[[], RoutingTrace | RoutingStats]] = {
        "hdmoe-json": lambda: external.read_hdmoe_json(path, model),
        "megatron-jsonl": lambda: external.read_megatron_jsonl(path, model),
        "load-csv": lambda: external.read_load_csv(path, model),
        "load-npz": lambda: external.read_load_npz(path, model),
        "sglang-csv": lambda: sglang.read_sglang_csv(path, model),
        "sglang-stat": lambda: sglang.read_sglang_stat(path, load_torch(path), model),
        "sglang-per-pass": lambda: sglang.read_sglang_per_pass(path, load_torch(path), model),
        "trtllm-stats": lambda: trtllm_stats.read_trtllm_stats(path, model),
    }
    result = readers[format]()
    if isinstance(result, RoutingStats):
        return stats_input(result)
    return trace_input(chunker(result, chunk_tokens), result.model)


def _checked(path: str | os.PathLike[str], chunks: Callable[[], Iterator[RoutingTrace]],
             num_gpus: int | None) -> Callable[[], Iterator[RoutingTrace]]:
    def stream() -> Iterator[RoutingTrace]:
        with guard(path, "routing data"):
            for chunk in chunks():
                if num_gpus is not None and chunk.home_rank is not None and chunk.home_rank.size \
                        and int(chunk.home_rank.max()) >= num_gpus:
                    raise fail(path, f"home rank {int(chunk.home_rank.max())} out of range for "
                                     f"{num_gpus} GPUs")
                yield chunk
    return stream


def read_trace(path: str | os.PathLike[str], *, model: ModelSpec | None = None,
               format: str | None = None) -> RoutingTrace:
    """The whole per-token trace of ``path`` in memory (all chunks concatenated)."""
    inp = read_input(path, model=model, format=format, chunk_tokens=sys.maxsize)
    if inp.kind != "trace" or inp.chunks is None:
        raise fail(path, f"this {inp.format} input holds only counts, not per-token routing")
    parts = list(inp.chunks())
    if len(parts) == 1:
        return parts[0]
    with guard(path, "routing data"):
        return concat_traces(parts)


def concat_traces(parts: list[RoutingTrace]) -> RoutingTrace:
    """Concatenate chunks of one trace along tokens; an optional field missing from any chunk is dropped."""
    if not parts:
        raise InvalidInputError("no trace chunks", source="trace")
    first = parts[0]

    def cat(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)
    order = "sorted" if all(p.order == "sorted" for p in parts) else "unknown"
    return RoutingTrace(np.concatenate([p.expert_ids for p in parts]), first.num_experts, order,
                        cat("gate_weights"), cat("request_ids"), cat("phase"), cat("home_rank"),
                        first.model)

