"""The placement files serving stacks load, and the flags that make each stack load them.

One writer and one reader per format; each writer returns the launch flags (one per line, notes
start with ``#``). The releases they were checked against are :data:`placer.stacks.STACKS`.

* ``sglang`` (SGLang 0.5.23 ``--init-expert-location``): ``{"physical_to_logical_map": [[P ids]]
  * num_hidden_layers}`` and nothing else, as ``.json`` or, for a ``.pt`` path, a ``torch.save``
  of the same dict holding an int64 tensor (loaded with ``weights_only=True``); dense-layer rows
  are the trivial ``arange(P) % E``. Other suffixes are refused (SGLang would parse the path as
  inline JSON).
* ``vllm``: read only (files of earlier placer versions); vLLM 0.34.0 loads no placement file.
* ``vllm-ascend`` (0.23.0.post1 ``eplb_config.expert_map_path``): ``{"moe_layer_count": L,
  "layer_list": [{"layer_id", "device_count", "device_list": [{"device_id", "device_expert":
  [ids in local-slot order]}]}]}``. vllm-ascend reads layers and devices by list position (the
  ids are written but never read), MoE layer ordinals (dense layers build no MoE module), and
  the path must end in ``.json``. No device may list an expert twice.
* ``trtllm`` (TensorRT-LLM 1.2 ``moe_config.load_balancer``): YAML ``num_slots: P``,
  ``layer_updates_per_iter: 0``, ``initial_global_assignments: {decoder layer index: [P ids]}``
  keyed by the decoder-layer index (``Deepseekv3MoE(layer_idx=...)``, so dense first layers
  count: DeepSeek-V3's MoE layers are 3..60).
* ``eplb`` (deepseek-ai/EPLB): npz ``phy2log`` [L, P], ``log2phy`` [L, E, P - E + 1] (replicas
  by replica rank, -1 padded) and ``logcnt`` [L, E], as ``eplb.rebalance_experts`` returns them.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from placer.errors import InfeasibleError, InvalidInputError, MissingDependencyError
from placer.io.atomic import atomic_path, atomic_write_text
from placer.io.common import fail, guard, load_arrays, load_torch, require_file
from placer.metrics.dispatch import hidden_layer_map
from placer.stacks import STACKS
from placer.types import ModelSpec, Placement, Topology
from placer.validate import duplicate_copies


def int_rows(path: str | os.PathLike[str], value: object, what: str) -> np.ndarray:
    """A non-empty JSON list of equal-length integer lists as int64 [rows, cols] (bad input names ``path``)."""
    if not isinstance(value, list) or not value or not all(isinstance(r, list) for r in value):
        raise fail(path, f"{what} must be a non-empty list of lists of ints")
    if any(not isinstance(x, int) or isinstance(x, bool) for r in value for x in r):
        raise fail(path, f"{what} must hold only integers")
    if len({len(r) for r in value}) != 1:
        raise fail(path, f"{what} rows have different lengths")
    return np.asarray(value, dtype=np.int64)


def load_json(path: str | os.PathLike[str], what: str) -> Any:
    """The parsed JSON of ``path``; a missing, truncated or malformed file is bad input."""
    require_file(path)
    with guard(path, what), open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# SGLang
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


def write_sglang(placement: Placement, path: str | os.PathLike[str], model: ModelSpec,
                 topology: Topology) -> list[str]:
    stack = STACKS["sglang"]
    stack.check_model(model, source=str(path))
    suffix = Path(path).suffix.lower()
    full = sglang_full_map(placement, model)
    if suffix == ".json":
        rows = ",\n".join("    " + json.dumps(row) for row in full.tolist())
        atomic_write_text(path, '{\n  "physical_to_logical_map": [\n' + rows + "\n  ]\n}\n")
    elif suffix == ".pt":
        try:
            import torch  # deferred: optional extra (placer[profile])
        except ImportError:
            raise MissingDependencyError("torch", "profile", "writing a .pt placement (a .json one does not)") from None
        with atomic_path(path) as tmp:
            torch.save({"physical_to_logical_map": torch.from_numpy(full)}, tmp)
    else:
        raise InvalidInputError(f"{stack.label} reads --init-expert-location as .json or .pt (any other path "
                                "is parsed as inline JSON); name the file *.json or *.pt", source=str(path))
    note = stack.model_note(model)
    return sglang_flags(path, topology, placement.num_redundant) + [
        f"# {stack.label}: static dispatch per EP rank (placer's sglang-static rule reproduces its tables)"] + (
        [f"# {note}"] if note else [])


def _sglang_rows(path: str | os.PathLike[str], p2l: np.ndarray, model: ModelSpec) -> np.ndarray:
    if p2l.ndim != 2:
        raise fail(path, f"physical_to_logical_map has shape {list(p2l.shape)}, expected [layers, slots]")
    if p2l.shape[0] == model.num_hidden_layers:
        return p2l[np.asarray(model.moe_layer_ids)]
    if p2l.shape[0] == model.num_moe_layers:
        return p2l
    raise fail(path, f"{p2l.shape[0]} rows; {model.name} needs {model.num_hidden_layers} (one per hidden layer)")


def read_sglang(path: str | os.PathLike[str], model: ModelSpec) -> np.ndarray:
    """The MoE rows of an SGLang ``--init-expert-location`` file (``.json`` or ``.pt``)."""
    if Path(path).suffix.lower() == ".pt":
        doc = load_torch(path)
        if not isinstance(doc, dict) or "physical_to_logical_map" not in doc:
            raise fail(path, "expected a torch.save'd dict with the key physical_to_logical_map")
        with guard(path, "SGLang placement .pt"):
            p2l = np.asarray(doc["physical_to_logical_map"].cpu().numpy() if hasattr(
                doc["physical_to_logical_map"], "cpu") else doc["physical_to_logical_map"])
        if not np.issubdtype(p2l.dtype, np.integer):
            raise fail(path, f"physical_to_logical_map must be integer, got {p2l.dtype}")
        return _sglang_rows(path, p2l.astype(np.int64), model)
    doc = load_json(path, "SGLang placement JSON")
    if not isinstance(doc, dict) or "physical_to_logical_map" not in doc:
        raise fail(path, "expected a JSON object with the key physical_to_logical_map")
    if len(doc) != 1:
        raise fail(path, f"SGLang rejects keys other than physical_to_logical_map; found "
                         f"{', '.join(k for k in doc if k != 'physical_to_logical_map')}")
    return _sglang_rows(path, int_rows(path, doc["physical_to_logical_map"], "physical_to_logical_map"), model)


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------


def vllm_flags(topology: Topology, num_redundant: int) -> list[str]:
    """vLLM 0.34.0 flags that turn on its own EPLB with ``num_redundant`` redundant experts."""
    g = topology.num_gpus
    flags = [f"--tensor-parallel-size {g}", "--enable-expert-parallel", "--enable-eplb",
             "--eplb-config " + shlex.quote(json.dumps({"num_redundant_experts": num_redundant}))]
    if topology.num_nodes > 1:
        flags.append(f"# EP size is TP x DP = {g}; spread it over the {topology.num_nodes} nodes as vLLM's "
                     "multi-node guide says (e.g. --data-parallel-size with --tensor-parallel-size per node)")
    return flags


def read_vllm(path: str | os.PathLike[str], model: ModelSpec, topology: Topology) -> np.ndarray:
    """A vLLM-style ``{"physical_to_logical_map", ...}`` file of earlier placer versions."""
    doc = load_json(path, "vLLM placement JSON")
    if not isinstance(doc, dict) or "physical_to_logical_map" not in doc:
        raise fail(path, "expected a JSON object with the key physical_to_logical_map")
    p2l = int_rows(path, doc["physical_to_logical_map"], "physical_to_logical_map")
    if "ep_size" in doc and doc["ep_size"] != topology.num_gpus:
        raise fail(path, f"ep_size {doc['ep_size']} does not match the cluster's {topology.num_gpus} GPUs")
    r = p2l.shape[1] - model.num_experts
    if "num_redundant_experts" in doc and doc["num_redundant_experts"] != r:
        raise fail(path, f"num_redundant_experts {doc['num_redundant_experts']} but the map has "
                         f"{p2l.shape[1]} slots for {model.num_experts} experts (R={r})")
    return p2l


# --------------------------------------------------------------------------------------------
# vllm-ascend
# --------------------------------------------------------------------------------------------


def ascend_flags(path: str | os.PathLike[str], topology: Topology, num_redundant: int) -> list[str]:
    """vllm-ascend flags: EP over data-parallel ranks (TP 1), the map and its redundancy."""
    g = topology.num_gpus
    config = {"eplb_config": {"expert_map_path": str(path), "num_redundant_experts": num_redundant}}
    flags = [f"--data-parallel-size {g}", "--tensor-parallel-size 1", "--enable-expert-parallel",
             "--additional-config " + shlex.quote(json.dumps(config))]
    if topology.num_nodes > 1:
        flags += [f"--data-parallel-size-local {topology.gpus_per_node}", "--data-parallel-address HEAD_IP",
                  "--data-parallel-rpc-port PORT",
                  f"# on nodes 1..{topology.num_nodes - 1} add --headless --data-parallel-start-rank "
                  f"NODE_RANK*{topology.gpus_per_node}"]
    flags += [f"# {STACKS['vllm-ascend'].label}: rank r sends an expert with n copies to copy r % n (placer's "
              "vllm-ascend rule); with --tensor-parallel-size T > 1 it picks (r % T + r // T + expert) % n "
              "instead, which placer does not score",
              "# the map is read only with expert parallelism over > 1 device; num_redundant_experts is "
              "checked against the map by vllm-ascend's newer sources"]
    return flags


def write_ascend(placement: Placement, path: str | os.PathLike[str], topology: Topology) -> list[str]:
    label = STACKS["vllm-ascend"].label
    if Path(path).suffix.lower() != ".json":
        raise InvalidInputError(f"{label} refuses an expert_map_path that does not end in .json",
                                source=str(path))
    if topology.num_gpus < 2:
        raise InfeasibleError(f"{label} reads the expert map only with expert parallelism over more than "
                              "one device (init_eplb_config returns early at EP size 1)")
    dup = duplicate_copies(placement)
    if dup:
        layer, gpu, expert = dup[0]
        raise InvalidInputError(
            f"layer {layer}: GPU {gpu} holds expert {expert} twice ({len(dup)} such duplicates); "
            f"{label} keeps one local slot per expert, so a second copy is never used and on device 0 "
            "shifts every device's slot numbers (tokens reach the wrong experts); re-solve with "
            "--stack vllm-ascend, which never places two copies on one device", source=str(path))
    experts = placement.gpu_experts()
    g = topology.num_gpus
    layers = [{"layer_id": layer, "device_count": g, "device_list": [
        {"device_id": d, "device_expert": experts[layer, d].tolist()} for d in range(g)]}
        for layer in range(placement.num_layers)]
    body = ",\n".join("  " + json.dumps(layer) for layer in layers)
    atomic_write_text(path, f'{{"moe_layer_count": {placement.num_layers}, "layer_list": [\n{body}\n]}}\n')
    return ascend_flags(path, topology, placement.num_redundant)


def read_ascend(path: str | os.PathLike[str], model: ModelSpec, topology: Topology) -> np.ndarray:
    """A vllm-ascend expert map, read by list position as vllm-ascend reads it."""
    doc = load_json(path, "vllm-ascend expert map")
    if not isinstance(doc, dict) or not isinstance(doc.get("layer_list"), list) or \
            not isinstance(doc.get("moe_layer_count"), int):
        raise fail(path, "expected {'moe_layer_count': L, 'layer_list': [...]}")
    count, layers = doc["moe_layer_count"], doc["layer_list"]
    if count != model.num_moe_layers:
        raise fail(path, f"moe_layer_count {count}, but {model.name} has {model.num_moe_layers} MoE layers")
    if len(layers) < count:
        raise fail(path, f"moe_layer_count {count} but only {len(layers)} layers listed")
    rows = []
    for i, layer in enumerate(layers[:count]):
        devices = layer.get("device_list") if isinstance(layer, dict) else None
        if not isinstance(devices, list) or not all(isinstance(d, dict) and "device_expert" in d for d in devices):
            raise fail(path, f"layer_list[{i}] needs a device_list of {{'device_expert': [...]}}")
        if len(devices) != topology.num_gpus:
            raise fail(path, f"layer_list[{i}] lists {len(devices)} devices, the cluster has {topology.num_gpus} "
                             "GPUs (vllm-ascend takes device j as EP rank j)")
        lists = [d["device_expert"] for d in devices]
        if len({len(x) if isinstance(x, list) else -1 for x in lists}) != 1:
            raise fail(path, f"layer_list[{i}]: devices list different numbers of experts (vllm-ascend needs "
                             "equal lists)")
        rows.append([x for lst in lists for x in lst])
    return int_rows(path, rows, "device_expert")


# --------------------------------------------------------------------------------------------
# TensorRT-LLM
# --------------------------------------------------------------------------------------------


def trtllm_flags(path: str | os.PathLike[str], topology: Topology) -> list[str]:
    """trtllm-serve flags and the LLM API options that load ``path`` (TensorRT-LLM 1.2)."""
    g = topology.num_gpus
    label = STACKS["trtllm"].label
    return [f"--tp_size {g}", f"--ep_size {g}", "--extra_llm_api_options EXTRA.yaml",
            "# EXTRA.yaml:",
            "#   enable_attention_dp: true",
            "#   moe_config:",
            f"#     load_balancer: {path}",
            f"# {label}'s MoE load balancer runs only with attention data parallelism and EP > 1 "
            "(\"Load Balancer should be only used with ADP and EP > 1\"); layer_updates_per_iter 0 keeps "
            "this placement static"] + (
        [f"# multi-node: launch through mpirun / trtllm-llmapi-launch over the {topology.num_nodes} nodes"]
        if topology.num_nodes > 1 else [])


def write_trtllm(placement: Placement, path: str | os.PathLike[str], model: ModelSpec,
                 topology: Topology) -> list[str]:
    if topology.num_gpus < 2:
        raise InfeasibleError(f"{STACKS['trtllm'].label}'s load balancer needs EP > 1 (one GPU has nothing "
                              "to balance)")
    lines = [f"# placer expert placement for TensorRT-LLM's MoE load balancer: model {model.name}, "
             f"{topology.num_gpus} GPUs; keys are decoder-layer indices",
             f"num_slots: {placement.num_slots}", "layer_updates_per_iter: 0", "initial_global_assignments:"]
    lines += [f"  {layer_id}: [{', '.join(str(int(x)) for x in row)}]"
              for layer_id, row in zip(model.moe_layer_ids, placement.physical_to_logical, strict=True)]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return trtllm_flags(path, topology)


def read_trtllm(path: str | os.PathLike[str], model: ModelSpec) -> np.ndarray:
    """A TensorRT-LLM load-balancer YAML (any YAML style), keyed by decoder-layer index."""
    require_file(path)
    with guard(path, "TRT-LLM YAML"), open(path, encoding="utf-8") as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise fail(path, f"not valid YAML ({' '.join(str(exc).split())})") from None
    if isinstance(doc, dict) and isinstance(doc.get("moe_config"), dict) and "load_balancer" in doc["moe_config"]:
        doc = doc["moe_config"]["load_balancer"]  # the LLM API options with the balancer inline
        if not isinstance(doc, dict):
            raise fail(path, "moe_config.load_balancer names another file; pass that file")
    if not isinstance(doc, dict) or not isinstance(doc.get("initial_global_assignments"), dict):
        raise fail(path, "expected num_slots and initial_global_assignments: {layer: [ids]}")
    assign = doc["initial_global_assignments"]
    try:
        keys = sorted(int(k) for k in assign)
    except (TypeError, ValueError):
        raise fail(path, "initial_global_assignments keys must be decoder-layer indices") from None
    want = list(model.moe_layer_ids)
    if keys != want:
        shifted = keys == list(range(len(want))) and want != keys
        raise fail(path, f"initial_global_assignments lists layers {_span(keys)}; TensorRT-LLM looks up "
                         f"{model.name}'s MoE layers by decoder-layer index {_span(want)}"
                         + (" (these keys are MoE ordinals, as earlier placer versions wrote them: every layer would "
                            "get the next one's placement; re-export)" if shifted else ""))
    by_key = {int(k): v for k, v in assign.items()}
    p2l = int_rows(path, [by_key[k] for k in keys], "initial_global_assignments")
    if "num_slots" in doc and doc["num_slots"] != p2l.shape[1]:
        raise fail(path, f"num_slots {doc['num_slots']} but layers list {p2l.shape[1]} ids")
    return p2l


def _span(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if ids and ids == list(range(ids[0], ids[-1] + 1)) else str(ids)


# --------------------------------------------------------------------------------------------
# DeepSeek EPLB arrays
# --------------------------------------------------------------------------------------------


def write_eplb(placement: Placement, path: str | os.PathLike[str]) -> list[str]:
    p2l = placement.physical_to_logical.astype(np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, phy2log=p2l, log2phy=placement.log2phy("replica", placement.num_redundant + 1),
                 logcnt=placement.logcnt())
    order = "replica rank (EPLB's)" if placement.replica_rank is not None else "ascending slot"
    return [f"# DeepSeek EPLB arrays in {path}: phy2log {list(p2l.shape)}, log2phy by {order}, logcnt; "
            "no serving flags"]


def read_eplb(path: str | os.PathLike[str], model: ModelSpec) -> tuple[np.ndarray, np.ndarray | None]:
    """(phy2log, replica ranks from log2phy or None) of an EPLB npz."""
    require_file(path)
    with guard(path, "EPLB npz"), load_arrays(path) as z:
        if "phy2log" not in z.files:
            raise fail(path, f"EPLB npz lacks phy2log (has {', '.join(sorted(z.files))})")
        p2l = np.asarray(z["phy2log"])
        if p2l.ndim != 2 or not np.issubdtype(p2l.dtype, np.integer):
            raise fail(path, f"phy2log must be an integer [layers, slots] array, got {p2l.dtype} "
                             f"{list(p2l.shape)}")
        p2l = p2l.astype(np.int64)
        if p2l.size == 0 or p2l.min() < 0 or p2l.max() >= model.num_experts:
            raise fail(path, f"phy2log ids must lie in [0, {model.num_experts})")
        cnt = np.zeros((p2l.shape[0], model.num_experts), dtype=np.int64)
        np.add.at(cnt, (np.repeat(np.arange(p2l.shape[0]), p2l.shape[1]), p2l.ravel()), 1)
        if "logcnt" in z.files and (z["logcnt"].shape != cnt.shape or not np.array_equal(z["logcnt"], cnt)):
            raise fail(path, "logcnt does not match phy2log")
        rank = None
        if "log2phy" in z.files:
            log2phy = np.asarray(z["log2phy"])
            if log2phy.ndim != 3 or log2phy.shape[:2] != cnt.shape or log2phy.shape[2] < cnt.max():
                raise fail(path, f"log2phy has shape {list(log2phy.shape)}, expected [{cnt.shape[0]}, "
                                 f"{cnt.shape[1]}, >= {cnt.max()}]")
            rank = np.full(p2l.shape, -1, dtype=np.int64)
            layer, expert, k = np.nonzero(log2phy >= 0)
            slot = log2phy[layer, expert, k].astype(np.int64)
            if slot.size != p2l.size or slot.max() >= p2l.shape[1] or \
                    not np.array_equal(p2l[layer, slot], expert):
                raise fail(path, "log2phy does not list the slots phy2log gives each expert")
            rank[layer, slot] = k
            if (rank < 0).any():
                raise fail(path, "log2phy does not list every slot")
        return p2l, rank
