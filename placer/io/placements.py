"""Placement files: placer's native JSON, and exporters/importers for serving stacks.

Native JSON (``write_placement_json`` / ``read_placement_json``) has exactly the top-level keys
``schema_version`` (2), ``physical_to_logical_map`` ([MoE layers, P] ints), ``slots_per_gpu``,
``model``, ``topology``, ``dispatch``, ``stack`` (``{"name", "release"}`` of the serving stack
whose rules it was solved under, or null), ``method``, ``status``, ``solve_seconds``,
``metrics``; its JSON Schema is ``placer/schemas/placement.schema.json``. Version 1 files (no
``stack``) are still read.

Serving formats (``FORMATS``):

* ``sglang`` (SGLang 0.5.23's ``--init-expert-location``): ``{"physical_to_logical_map": [[P
  ids]] * num_hidden_layers}`` and nothing else, as ``.json`` or, for a ``.pt`` path, a
  ``torch.save`` of the same dict holding an int64 tensor (SGLang loads it with
  ``weights_only=True``); dense-layer rows are the trivial ``arange(P) % E``. Other suffixes are
  refused (SGLang would parse the path as inline JSON).
* ``vllm``: read only (files of earlier placer versions). vLLM 0.34.0 loads no placement file;
  exporting for it raises :class:`VllmLoadsNoFile`, which carries the flags that turn on vLLM's
  own EPLB.
* ``vllm-ascend``: ``{"moe_layer_count": L, "layer_list": [{"layer_id", "device_count",
  "device_list": [{"device_id", "device_expert": [ids in local-slot order]}]}]}``.
* ``trtllm``: YAML ``num_slots: P``, ``layer_updates_per_iter: 0``,
  ``initial_global_assignments: {MoE layer index: [P ids]}`` (written and read as a small
  fixed YAML subset; PyYAML is not needed).
* ``eplb``: npz ``phy2log`` [L, P], ``log2phy`` [L, E, X] (-1 padded), ``logcnt`` [L, E].
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from placer.dispatch import hidden_layer_map
from placer.errors import InvalidInputError
from placer.io._common import fail, guard, require_file
from placer.io.atomic import atomic_path, atomic_write_text
from placer.stacks import STACKS, Stack, get_stack
from placer.types import DISPATCH_RULES, ModelSpec, Placement, Topology
from placer.validate import check_placement

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMATS = ("sglang", "vllm", "vllm-ascend", "trtllm", "eplb")
NATIVE_KEYS = ("schema_version", "physical_to_logical_map", "slots_per_gpu", "model", "topology",
               "dispatch", "stack", "method", "status", "solve_seconds", "metrics")
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
    """Plain JSON values: numpy scalars and arrays converted, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if value is None or isinstance(value, str):
        return value
    raise InvalidInputError(f"cannot store {type(value).__name__} in JSON", source=where)


def _dumps(doc: dict[str, Any], row_keys: tuple[str, ...] = ("physical_to_logical_map",)) -> str:
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


def _load_json(path: str | os.PathLike[str], what: str) -> Any:
    require_file(path)
    with guard(path, what), open(path, encoding="utf-8") as f:
        return json.load(f)


def _map(path: str | os.PathLike[str], value: Any, what: str = "physical_to_logical_map") -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise fail(path, f"{what} must be a non-empty list of lists of ints")
    if any(not isinstance(x, int) or isinstance(x, bool) for r in value for x in r):
        raise fail(path, f"{what} must hold only integers")
    if len({len(r) for r in value}) != 1:
        raise fail(path, f"{what} rows have different lengths")
    return np.asarray(value, dtype=np.int64)


def _placement(path: str | os.PathLike[str], p2l: np.ndarray, model: ModelSpec,
               topology: Topology) -> Placement:
    """A checked Placement from a MoE-layer map, slots split evenly over the cluster's GPUs."""
    if p2l.ndim != 2:
        raise fail(path, f"map has shape {list(p2l.shape)}, expected [layers, slots]")
    num_slots = p2l.shape[1]
    if num_slots % topology.num_gpus:
        raise fail(path, f"{num_slots} slots per layer do not split evenly over {topology.num_gpus} GPUs")
    with guard(path, "placement"):
        placement = Placement(p2l, num_slots // topology.num_gpus, model.num_experts)
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
           "slots_per_gpu": placement.slots_per_gpu,
           "model": _jsonable(model.to_dict(), where), "topology": _jsonable(topology.to_dict(), where),
           "dispatch": dispatch, "stack": None if stack is None else stack.to_dict(),
           "method": str(method), "status": status,
           "solve_seconds": float(solve_seconds), "metrics": _jsonable(dict(metrics or {}), where)}
    atomic_write_text(path, _dumps(doc))


def read_placement_json(path: str | os.PathLike[str]) -> PlacementFile:
    """Read and fully validate a native placement file."""
    doc = _load_json(path, "placement JSON")
    if not isinstance(doc, dict):
        raise fail(path, "placement file must be a JSON object")
    if doc.get("schema_version") == 1:
        doc = {**doc, "stack": None}
    missing = [k for k in NATIVE_KEYS if k not in doc]
    if missing:
        hint = " (an SGLang export? read it with import_placement(..., 'sglang'))" \
            if list(doc) == ["physical_to_logical_map"] else ""
        raise fail(path, f"placement file lacks key(s) {', '.join(missing)}{hint}")
    extra = [k for k in doc if k not in NATIVE_KEYS]
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
        p2l = _map(path, doc["physical_to_logical_map"])
        placement = Placement(p2l, doc["slots_per_gpu"], model.num_experts)
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
    starting with ``#``. The placement is checked first (:func:`check_placement`).
    """
    _check_format(fmt, path)
    check_placement(placement, model, topology)
    p2l = placement.physical_to_logical
    num_layers, num_slots = p2l.shape
    g, r = topology.num_gpus, placement.num_redundant
    if fmt == "vllm":
        raise VllmLoadsNoFile(vllm_flags(topology, r), source=str(path))
    if fmt == "sglang":
        return _export_sglang(placement, path, model, topology)
    if fmt == "vllm-ascend":
        experts = placement.gpu_experts()
        doc = {"moe_layer_count": num_layers, "layer_list": [
            {"layer_id": layer, "device_count": g, "device_list": [
                {"device_id": d, "device_expert": experts[layer, d].tolist()} for d in range(g)]}
            for layer in range(num_layers)]}
        atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
        config = {"eplb_config": {"expert_map_path": str(path)}}
        return ["--additional-config " + shlex.quote(json.dumps(config))]
    if fmt == "trtllm":
        lines = [f"# placer expert placement for TensorRT-LLM's MoE load balancer: model {model.name}, "
                 f"{g} GPUs", f"num_slots: {num_slots}", "layer_updates_per_iter: 0",
                 "initial_global_assignments:"]
        lines += [f"  {layer}: [{', '.join(str(int(x)) for x in row)}]" for layer, row in enumerate(p2l)]
        atomic_write_text(path, "\n".join(lines) + "\n")
        return [f"--ep_size {g}",
                f"# reference {path} from the YAML passed to --extra_llm_api_options as "
                "'moe_config: {load_balancer: PATH}' (older releases: 'moe_load_balancer: PATH')"]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, phy2log=p2l.astype(np.int64), log2phy=placement.log2phy(), logcnt=placement.logcnt())
    return [f"# DeepSeek EPLB arrays in {path}: phy2log [{num_layers}, {num_slots}], log2phy, logcnt; "
            "no serving flags"]


def import_placement(path: str | os.PathLike[str], fmt: str, *, model: ModelSpec,
                     topology: Topology) -> Placement:
    """Read a placement written in serving format ``fmt`` (checked against model and cluster)."""
    _check_format(fmt, path)
    if fmt == "sglang":
        return _placement(path, _read_sglang(path, model), model, topology)
    if fmt == "vllm":
        return _placement(path, _read_vllm(path, model, topology), model, topology)
    if fmt == "vllm-ascend":
        return _placement(path, _read_ascend(path, topology), model, topology)
    if fmt == "trtllm":
        return _placement(path, _read_trtllm(path, model), model, topology)
    return _placement(path, _read_eplb(path, model), model, topology)


def _read_sglang(path: str | os.PathLike[str], model: ModelSpec) -> np.ndarray:
    doc = _load_json(path, "SGLang placement JSON")
    if not isinstance(doc, dict) or "physical_to_logical_map" not in doc:
        raise fail(path, "expected a JSON object with the key physical_to_logical_map")
    if len(doc) != 1:
        raise fail(path, f"SGLang rejects keys other than physical_to_logical_map; found "
                         f"{', '.join(k for k in doc if k != 'physical_to_logical_map')}")
    p2l = _map(path, doc["physical_to_logical_map"])
    if p2l.shape[0] == model.num_hidden_layers:
        return p2l[np.asarray(model.moe_layer_ids)]
    if p2l.shape[0] == model.num_moe_layers:
        return p2l
    raise fail(path, f"{p2l.shape[0]} rows; {model.name} needs {model.num_hidden_layers} (one per hidden layer)")


def _read_vllm(path: str | os.PathLike[str], model: ModelSpec, topology: Topology) -> np.ndarray:
    doc = _load_json(path, "vLLM placement JSON")
    if not isinstance(doc, dict) or "physical_to_logical_map" not in doc:
        raise fail(path, "expected a JSON object with the key physical_to_logical_map")
    p2l = _map(path, doc["physical_to_logical_map"])
    if "ep_size" in doc and doc["ep_size"] != topology.num_gpus:
        raise fail(path, f"ep_size {doc['ep_size']} does not match the cluster's {topology.num_gpus} GPUs")
    r = p2l.shape[1] - model.num_experts
    if "num_redundant_experts" in doc and doc["num_redundant_experts"] != r:
        raise fail(path, f"num_redundant_experts {doc['num_redundant_experts']} but the map has "
                         f"{p2l.shape[1]} slots for {model.num_experts} experts (R={r})")
    return p2l


def _read_ascend(path: str | os.PathLike[str], topology: Topology) -> np.ndarray:
    doc = _load_json(path, "vllm-ascend expert map")
    with guard(path, "vllm-ascend expert map"):
        if not isinstance(doc, dict) or not isinstance(doc.get("layer_list"), list):
            raise fail(path, "expected {'moe_layer_count': L, 'layer_list': [...]}")
        layers = doc["layer_list"]
        if doc.get("moe_layer_count") != len(layers):
            raise fail(path, f"moe_layer_count {doc.get('moe_layer_count')} but {len(layers)} layers listed")
        rows = []
        for i, layer in enumerate(layers):
            if layer["layer_id"] != i:
                raise fail(path, f"layer_list[{i}] has layer_id {layer['layer_id']}, expected {i}")
            devices = sorted(layer["device_list"], key=lambda d: d["device_id"])
            if [d["device_id"] for d in devices] != list(range(len(devices))) or \
                    layer["device_count"] != len(devices):
                raise fail(path, f"layer {i}: device ids must be 0..device_count-1")
            if len(devices) != topology.num_gpus:
                raise fail(path, f"layer {i} has {len(devices)} devices, the cluster {topology.num_gpus} GPUs")
            lists = [d["device_expert"] for d in devices]
            if len({len(x) for x in lists}) != 1:
                raise fail(path, f"layer {i}: devices hold different numbers of experts")
            rows.append([x for lst in lists for x in lst])
        return _map(path, rows, "device_expert")


_YAML_INT = re.compile(r"^([A-Za-z_]+):\s*(\d+)?\s*$")
_YAML_ROW = re.compile(r"^\s+(\d+):\s*\[([\d,\s]*)\]\s*$")


def _read_trtllm(path: str | os.PathLike[str], model: ModelSpec) -> np.ndarray:
    """The YAML subset placer writes. Layer keys are MoE ordinals 0..L-1; keys equal to
    ``model.moe_layer_ids`` (absolute decoder-layer indices) are accepted too."""
    require_file(path)
    with guard(path, "TRT-LLM YAML"), open(path, encoding="utf-8") as f:
        scalars: dict[str, int | None] = {}
        rows: dict[int, list[int]] = {}
        for n, raw in enumerate(f, start=1):
            line = raw.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            m_row = _YAML_ROW.match(line)
            m_key = _YAML_INT.match(line)
            if m_row and "initial_global_assignments" in scalars:
                layer = int(m_row.group(1))
                if layer in rows:
                    raise fail(path, f"line {n}: layer {layer} listed twice")
                rows[layer] = [int(x) for x in m_row.group(2).split(",") if x.strip()]
            elif m_key:
                scalars[m_key.group(1)] = int(m_key.group(2)) if m_key.group(2) else None
            else:
                raise fail(path, f"line {n}: not in placer's TRT-LLM YAML subset: {line.strip()!r}")
        if "num_slots" not in scalars or not rows:
            raise fail(path, "expected num_slots and initial_global_assignments")
        keys = sorted(rows)
        if keys != list(range(len(rows))) and keys != list(model.moe_layer_ids):
            raise fail(path, f"initial_global_assignments layers must be 0..{len(rows) - 1} or the "
                             f"MoE layer ids of {model.name}")
        p2l = _map(path, [rows[i] for i in keys], "initial_global_assignments")
        if p2l.shape[1] != scalars["num_slots"]:
            raise fail(path, f"num_slots {scalars['num_slots']} but layers list {p2l.shape[1]} ids")
        return p2l


def _read_eplb(path: str | os.PathLike[str], model: ModelSpec) -> np.ndarray:
    require_file(path)
    with guard(path, "EPLB npz"), np.load(path, allow_pickle=False) as z:
        if "phy2log" not in z.files:
            raise fail(path, f"EPLB npz lacks phy2log (has {', '.join(sorted(z.files))})")
        p2l = np.asarray(z["phy2log"])
        if p2l.ndim != 2 or not np.issubdtype(p2l.dtype, np.integer):
            raise fail(path, f"phy2log must be an integer [layers, slots] array, got {p2l.dtype} "
                             f"{list(p2l.shape)}")
        p2l = p2l.astype(np.int64)
        if "logcnt" in z.files and p2l.size and p2l.min() >= 0 and p2l.max() < model.num_experts:
            cnt = np.zeros((p2l.shape[0], model.num_experts), dtype=np.int64)
            np.add.at(cnt, (np.repeat(np.arange(p2l.shape[0]), p2l.shape[1]), p2l.ravel()), 1)
            if z["logcnt"].shape != cnt.shape or not np.array_equal(z["logcnt"], cnt):
                raise fail(path, "logcnt does not match phy2log")
        return p2l


# --------------------------------------------------------------------------------------------
# SGLang and vLLM: files and flags their releases accept
# --------------------------------------------------------------------------------------------


def sglang_full_map(placement: Placement, model: ModelSpec) -> np.ndarray:
    """The int64 [num_hidden_layers, P] map SGLang loads: dense rows are ``arange(P) % E``."""
    return hidden_layer_map(placement, model)[0]


def sglang_flags(path: str | os.PathLike[str], topology: Topology, num_redundant: int) -> list[str]:
    """SGLang 0.5.23 flags that load ``path`` with static dispatch (checked by its own start-up code).

    Static dispatch needs an a2a backend (DeepEP): with the default ``--moe-a2a-backend none``
    SGLang rejects ``static`` and would resolve to ``dynamic``. ``--tp-size`` must equal the EP
    size (``tp_size == moe_ep_size * moe_dp_size * moe_tp_size``).
    """
    g = topology.num_gpus
    flags = [f"--tp-size {g}", f"--ep-size {g}", "--moe-a2a-backend deepep",
             "--ep-dispatch-algorithm static", f"--ep-num-redundant-experts {num_redundant}",
             f"--init-expert-location {shlex.quote(str(path))}"]
    if topology.num_nodes > 1:
        flags += [f"--nnodes {topology.num_nodes}", "--node-rank NODE_RANK", "--dist-init-addr HEAD_IP:PORT",
                  f"# on each of the {topology.num_nodes} nodes, NODE_RANK 0..{topology.num_nodes - 1}; "
                  f"{topology.gpus_per_node} GPUs per node"]
    return flags


def _export_sglang(placement: Placement, path: str | os.PathLike[str], model: ModelSpec,
                   topology: Topology) -> list[str]:
    stack = STACKS["sglang"]
    stack.check_model(model, source=str(path))
    suffix = Path(path).suffix.lower()
    full = sglang_full_map(placement, model)
    if suffix == ".json":
        atomic_write_text(path, _dumps({"physical_to_logical_map": full.tolist()}))
    elif suffix == ".pt":
        try:
            import torch
        except ImportError:
            from placer.errors import MissingDependencyError
            raise MissingDependencyError("writing a .pt placement needs torch (pip install 'placer[profile]'), "
                                         "or write .json") from None
        with atomic_path(path) as tmp:
            torch.save({"physical_to_logical_map": torch.from_numpy(full)}, tmp)
    else:
        raise InvalidInputError(f"{stack.label} reads --init-expert-location as .json or .pt (any other path "
                                "is parsed as inline JSON); name the file *.json or *.pt", source=str(path))
    note = stack.model_note(model)
    return sglang_flags(path, topology, placement.num_redundant) + [
        f"# {stack.label}: static dispatch per EP rank (placer's sglang-static rule reproduces its tables)"] + (
        [f"# {note}"] if note else [])


def vllm_flags(topology: Topology, num_redundant: int) -> list[str]:
    """vLLM 0.34.0 flags that turn on its own EPLB with ``num_redundant`` redundant experts."""
    g = topology.num_gpus
    flags = [f"--tensor-parallel-size {g}", "--enable-expert-parallel", "--enable-eplb",
             "--eplb-config " + shlex.quote(json.dumps({"num_redundant_experts": num_redundant}))]
    if topology.num_nodes > 1:
        flags.append(f"# EP size is TP x DP = {g}; spread it over the {topology.num_nodes} nodes as vLLM's "
                     "multi-node guide says (e.g. --data-parallel-size with --tensor-parallel-size per node)")
    return flags
