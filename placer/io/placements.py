"""Placement files: placer's native JSON, and exporters/importers for serving stacks.

Native JSON (``write_placement_json`` / ``read_placement_json``) has exactly the top-level keys
``schema_version`` (2), ``physical_to_logical_map`` ([MoE layers, P] ints), ``slots_per_gpu``,
``model``, ``topology``, ``dispatch``, ``stack`` (``{"name", "release"}`` of the serving stack
whose rules it was solved under, or null), ``method``, ``status``, ``solve_seconds``,
``metrics``; its JSON Schema is ``placer/schemas/placement.schema.json``. Version 1 files (no
``stack``) are still read.

Serving formats (``FORMATS``, written and read by :mod:`placer.io.stack_files`): ``sglang``,
``vllm`` (read only: vLLM 0.34.0 loads no placement file, so exporting for it raises
:class:`VllmLoadsNoFile`, which carries the flags that turn on vLLM's own EPLB),
``vllm-ascend``, ``trtllm`` and ``eplb``. :func:`read_placement_file` reads any of them, or a
native file, detected from the suffix and the content.

A native file also holds ``replica_rank`` ([MoE layers, P]) when the placement carries replica
ranks (DeepSeek EPLB's creation order, kept for the ``eplb`` export's ``log2phy``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from placer.display import json_value
from placer.errors import InvalidInputError
from placer.io import stack_files as sf
from placer.io.atomic import atomic_write_text
from placer.io.common import fail, guard
from placer.stacks import STACKS, Stack, get_stack
from placer.types import DISPATCH_RULES, ModelSpec, Placement, Topology
from placer.validate import check_placement

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMATS = ("sglang", "vllm", "vllm-ascend", "trtllm", "eplb")
NATIVE_KEYS = ("schema_version", "physical_to_logical_map", "slots_per_gpu", "model", "topology",
               "dispatch", "stack", "method", "status", "solve_seconds", "metrics")
OPTIONAL_KEYS = ("replica_rank",)
WRITABLE_FORMATS = ("sglang", "vllm-ascend", "trtllm", "eplb")
WRITABLE_STATUSES = ("optimal", "feasible", "timeout")
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "placement.schema.json"


@dataclass(frozen=True)
class PlacementFile:
    """A native placement file, read back."""

    placement: Placement
    model: ModelSpec
    topology: Topology
    dispatch: str
    method: str
    status: str
    solve_seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    stack: Stack | None = None


class VllmLoadsNoFile(InvalidInputError):
    """Export for vLLM: it loads no placement file. ``flags`` turn on its own EPLB instead."""

    def __init__(self, flags: list[str], source: str):
        stack = STACKS["vllm"]
        super().__init__(f"{stack.label} loads no placement file; it re-balances itself every "
                         "step_interval steps (the flags printed turn on its EPLB with this redundancy; "
                         "score what its rule does with --stack vllm on evaluate, simulate or serve)",
                         source=source)
        self.flags = flags


# --------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON values (:func:`placer.display.json_value`); a value JSON cannot hold exits 2."""
    try:
        return json_value(value)
    except TypeError as exc:
        raise InvalidInputError(f"cannot store in JSON: {exc}", source=where) from None


def _dumps(doc: dict[str, Any], row_keys: tuple[str, ...] = ("physical_to_logical_map", "replica_rank")) -> str:
    """JSON with 2-space indent, except that each row of a list-of-lists key stays on one line."""
    lines = []
    for i, (key, value) in enumerate(doc.items()):
        comma = "," if i < len(doc) - 1 else ""
        if key in row_keys:
            rows = ",\n".join("    " + json.dumps(row) for row in value)
            text = f"[\n{rows}\n  ]"
        else:
            text = json.dumps(value, indent=2).replace("\n", "\n  ")
        lines.append(f"  {json.dumps(key)}: {text}{comma}")
    return "{\n" + "\n".join(lines) + "\n}\n"


def _placement(path: str | os.PathLike[str], p2l: np.ndarray, model: ModelSpec,
               topology: Topology, rank: np.ndarray | None = None) -> Placement:
    """A checked Placement from a MoE-layer map, slots split evenly over the cluster's GPUs."""
    if p2l.ndim != 2:
        raise fail(path, f"map has shape {list(p2l.shape)}, expected [layers, slots]")
    num_slots = p2l.shape[1]
    if num_slots % topology.num_gpus:
        raise fail(path, f"{num_slots} slots per layer do not split evenly over {topology.num_gpus} GPUs")
    with guard(path, "placement"):
        placement = Placement(p2l, num_slots // topology.num_gpus, model.num_experts, rank)
        return check_placement(placement, model, topology)


# --------------------------------------------------------------------------------------------
# Native JSON
# --------------------------------------------------------------------------------------------


def write_placement_json(path: str | os.PathLike[str], placement: Placement, *, model: ModelSpec,
                         topology: Topology, dispatch: str, method: str, status: str,
                         solve_seconds: float, metrics: dict[str, Any] | None = None,
                         stack: Stack | None = None) -> None:
    """Write a native placement file atomically (after :func:`check_placement`)."""
    check_placement(placement, model, topology)
    where = str(path)
    if dispatch not in DISPATCH_RULES:
        raise InvalidInputError(f"unknown dispatch rule {dispatch!r}; rules: {', '.join(DISPATCH_RULES)}",
                                source=where)
    if status not in WRITABLE_STATUSES:
        raise InvalidInputError(f"status must be one of {', '.join(WRITABLE_STATUSES)} for a placement, "
                                f"got {status!r}", source=where)
    if not math.isfinite(solve_seconds) or solve_seconds < 0:
        raise InvalidInputError(f"solve_seconds must be a non-negative number, got {solve_seconds}",
                                source=where)
    doc = {"schema_version": SCHEMA_VERSION,
           "physical_to_logical_map": placement.physical_to_logical.tolist(),
           **({} if placement.replica_rank is None else {"replica_rank": placement.replica_rank.tolist()}),
           "slots_per_gpu": placement.slots_per_gpu,
           "model": _jsonable(model.to_dict(), where), "topology": _jsonable(topology.to_dict(), where),
           "dispatch": dispatch, "stack": None if stack is None else stack.to_dict(),
           "method": str(method), "status": status,
           "solve_seconds": float(solve_seconds), "metrics": _jsonable(dict(metrics or {}), where)}
    atomic_write_text(path, _dumps(doc))


def read_placement_json(path: str | os.PathLike[str]) -> PlacementFile:
    """Read and fully validate a native placement file."""
    doc = sf.load_json(path, "placement JSON")
    if not isinstance(doc, dict):
        raise fail(path, "placement file must be a JSON object")
    if doc.get("schema_version") == 1:
        doc = {**doc, "stack": None}
    missing = [k for k in NATIVE_KEYS if k not in doc]
    if missing:
        hint = " (an SGLang export: placer commands read it given --model and --gpus)" \
            if list(doc) == ["physical_to_logical_map"] else ""
        raise fail(path, f"placement file lacks key(s) {', '.join(missing)}{hint}")
    extra = [k for k in doc if k not in NATIVE_KEYS and k not in OPTIONAL_KEYS]
    if extra:
        raise fail(path, f"placement file has unknown key(s) {', '.join(extra)}")
    if doc["schema_version"] not in READABLE_VERSIONS:
        raise fail(path, f"unsupported schema_version {doc['schema_version']!r} (this version reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    stack = None
    if doc["stack"] is not None:
        if not isinstance(doc["stack"], dict) or set(doc["stack"]) != {"name", "release"}:
            raise fail(path, "stack must be null or {\"name\", \"release\"}")
        stack = get_stack(str(doc["stack"]["name"]), source=str(path))
        if doc["stack"]["release"] != stack.release:
            raise fail(path, f"solved for {stack.name} {doc['stack']['release']}; this placer reproduces "
                             f"{stack.label} (re-solve or re-score it with --stack {stack.name})")
    for key, kind in (("slots_per_gpu", int), ("model", dict), ("topology", dict), ("dispatch", str),
                      ("method", str), ("status", str), ("solve_seconds", (int, float)), ("metrics", dict)):
        if not isinstance(doc[key], kind) or isinstance(doc[key], bool):
            raise fail(path, f"{key} has the wrong type ({type(doc[key]).__name__})")
    if doc["dispatch"] not in DISPATCH_RULES:
        raise fail(path, f"unknown dispatch rule {doc['dispatch']!r}")
    if doc["status"] not in WRITABLE_STATUSES:
        raise fail(path, f"unknown status {doc['status']!r}")
    with guard(path, "placement JSON"):
        model = ModelSpec.from_dict(doc["model"])
        topology = Topology.from_dict(doc["topology"])
        p2l = sf.int_rows(path, doc["physical_to_logical_map"], "physical_to_logical_map")
        rank = sf.int_rows(path, doc["replica_rank"], "replica_rank") if "replica_rank" in doc else None
        placement = Placement(p2l, doc["slots_per_gpu"], model.num_experts, rank)
        check_placement(placement, model, topology)
    return PlacementFile(placement, model, topology, doc["dispatch"], doc["method"], doc["status"],
                         float(doc["solve_seconds"]), doc["metrics"], stack)


# --------------------------------------------------------------------------------------------
# Serving formats
# --------------------------------------------------------------------------------------------


def _check_format(fmt: str, path: str | os.PathLike[str]) -> None:
    if fmt not in FORMATS:
        raise InvalidInputError(f"unknown placement format {fmt!r}; formats: {', '.join(FORMATS)}",
                                source=str(path))


def export_placement(placement: Placement, fmt: str, path: str | os.PathLike[str], *,
                     model: ModelSpec, topology: Topology) -> list[str]:
    """Write ``placement`` in serving format ``fmt``; return the serving flags matching the file.

    The lines are flags (one per line) to add to the server's launch command, and notes
    starting with ``#``. The placement is checked first (:func:`check_placement`), and against
    the target stack's constraints (vllm-ascend: one copy of an expert per GPU).
    """
    _check_format(fmt, path)
    check_placement(placement, model, topology)
    if fmt == "vllm":
        raise VllmLoadsNoFile(sf.vllm_flags(topology, placement.num_redundant), source=str(path))
    if fmt == "sglang":
        return sf.write_sglang(placement, path, model, topology)
    if fmt == "vllm-ascend":
        return sf.write_ascend(placement, path, topology)
    if fmt == "trtllm":
        return sf.write_trtllm(placement, path, model, topology)
    return sf.write_eplb(placement, path)


def import_placement(path: str | os.PathLike[str], fmt: str, *, model: ModelSpec,
                     topology: Topology) -> Placement:
    """Read a placement written in serving format ``fmt`` (checked against model and cluster)."""
    _check_format(fmt, path)
    rank = None
    if fmt == "sglang":
        p2l = sf.read_sglang(path, model)
    elif fmt == "vllm":
        p2l = sf.read_vllm(path, model, topology)
    elif fmt == "vllm-ascend":
        p2l = sf.read_ascend(path, model, topology)
    elif fmt == "trtllm":
        p2l = sf.read_trtllm(path, model)
    else:
        p2l, rank = sf.read_eplb(path, model)
    return _placement(path, p2l, model, topology, rank)


def detect_placement_format(path: str | os.PathLike[str]) -> str:
    """``native`` or a :data:`FORMATS` entry, from the suffix and (for JSON) the top-level keys."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pt":
        return "sglang"
    if suffix in (".yaml", ".yml"):
        return "trtllm"
    if suffix == ".npz":
        return "eplb"
    if suffix != ".json":
        raise InvalidInputError(f"cannot tell the placement format from the suffix {suffix or '(none)'!r}: "
                                "placer reads .json (placer, SGLang, vllm-ascend), .pt (SGLang), "
                                ".yaml (TensorRT-LLM) and .npz (DeepSeek EPLB arrays)", source=str(path))
    doc = sf.load_json(path, "placement JSON")
    keys = set(doc) if isinstance(doc, dict) else set()
    if "schema_version" in keys:
        return "native"
    if keys == {"physical_to_logical_map"}:
        return "sglang"
    if "layer_list" in keys:
        return "vllm-ascend"
    if "physical_to_logical_map" in keys:
        return "vllm"
    raise fail(path, "not a placement file placer knows (placer: schema_version; SGLang: "
                     "physical_to_logical_map; vllm-ascend: moe_layer_count and layer_list)")


def read_placement_file(path: str | os.PathLike[str], *, model: ModelSpec | None = None,
                        topology: Topology | None = None, stack: Stack | None = None) -> PlacementFile:
    """Any placement file: placer's own or a serving stack's, detected from suffix and content.

    A native file carries its model, cluster, rule and stack (``model``/``topology`` are not
    used). A stack's file carries only the map: ``model`` and ``topology`` are required, and the
    stack is the file's (SGLang, vllm-ascend, TRT-LLM; none for EPLB arrays) unless ``stack``
    names another whose format it is. ``dispatch`` is the stack's rule, else ``nearest``.
    """
    fmt = detect_placement_format(path)
    if fmt == "native":
        return read_placement_json(path)
    owner = next((s for s in STACKS.values() if s.format == fmt), None)
    if stack is not None and owner is not None and stack is not owner:
        raise InvalidInputError(f"this is a {owner.label} file ({fmt}); --stack {stack.name} loads "
                                f"{stack.format or 'no file'}", source=str(path))
    if model is None or topology is None:
        raise InvalidInputError(f"a {fmt} placement file holds only the map: give --model and the cluster "
                                "(--gpus, --nodes or --cluster)", source=str(path))
    placement = import_placement(path, fmt, model=model, topology=topology)
    used = stack or owner
    if used is not None and used.distinct_per_gpu:
        check_placement(placement, model, topology, distinct_per_gpu=True)
    rule = used.dispatch if used is not None and used.dispatch is not None else "nearest"
    return PlacementFile(placement, model, topology, rule, f"file:{fmt}", "feasible", 0.0, {}, used)
