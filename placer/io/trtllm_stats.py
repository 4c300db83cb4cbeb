"""TensorRT-LLM expert statistics: the input of its offline EP load balancer.

TensorRT-LLM 1.2 (``examples/wide_ep/ep_load_balancer/``; ``tensorrt_llm/_torch/expert_statistic.py``)
records routing when the model runs with ``EXPERT_STATISTIC_PATH=DIR`` and
``EXPERT_STATISTIC_ITER_RANGE=START-STOP``. It writes into ``DIR``:

* ``meta_info.json``: ``{"num_experts": E, "num_experts_per_token": K, ...}`` (other keys are
  ignored here);
* ``rank{r}.safetensors``, one per rank: tensors keyed ``"{iteration}_{layer}"``, each an int
  vector ``[E]`` of per-expert token counts (a ``bincount`` of that rank's
  ``token_selected_experts`` at that iteration and layer). ``layer`` is the decoder-layer index
  (``layer_idx`` of TRT-LLM's ``Deepseekv3MoE``, which counts the dense first layers: on
  DeepSeek-V3 the MoE layers are 3..60);
* possibly ``rank{r}_raw.safetensors`` (the raw ``token_selected_experts``): ignored here, as
  is any other file.

Like TRT-LLM's ``generate_eplb_config.py``, the counts are summed over ranks and iterations
per layer (nothing else about the iteration range is honoured). When each rank routes the
same tokens (attention TP rather than attention DP), the sum counts every token once per rank:
the relative loads, which placement depends on, are unchanged.

The safetensors files are parsed here without the ``safetensors`` package: an 8-byte
little-endian header length, a JSON header ``{name: {"dtype", "shape", "data_offsets"}}``
(plus an optional ``"__metadata__"``), then the little-endian tensor bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from placer.io.common import check_load, check_shape, fail, guard
from placer.stats import load_only_stats
from placer.types import ModelSpec, RoutingStats

META_FILE = "meta_info.json"
RANK_FILE = re.compile(r"^rank(\d+)\.safetensors$")
_KEY = re.compile(r"^(\d+)_(\d+)$")
# safetensors' own reader refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000
_DTYPES = {
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1",
    "F64": "<f8", "F32": "<f4", "F16": "<f2",
}


def stats_dir(path: str | os.PathLike[str]) -> Path:
    """The statistics directory of ``path``: the directory itself, or the folder of its
    ``meta_info.json``."""
    p = Path(path)
    if p.is_dir():
        return p
    if not p.exists():
        raise fail(path, "file not found")
    if p.name != META_FILE:
        raise fail(path, f"expected a TensorRT-LLM expert-statistic directory or its {META_FILE}")
    return p.parent


def is_stats_dir(path: str | os.PathLike[str]) -> bool:
    """Whether a directory looks like TRT-LLM expert statistics (``meta_info.json`` or
    ``rank{r}.safetensors`` files in it)."""
    p = Path(path)
    try:
        return p.is_dir() and ((p / META_FILE).is_file()
                               or any(RANK_FILE.match(c.name) for c in p.iterdir()))
    except OSError:
        return False


def _positive_int(path: Path, meta: dict[str, Any], key: str) -> int:
    if key not in meta:
        raise fail(path, f"lacks {key!r}")
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise fail(path, f"{key} must be a positive integer, got {v!r}")
    return v


def read_meta(path: Path) -> tuple[int, int]:
    """``(num_experts, num_experts_per_token)`` of a ``meta_info.json``."""
    if not path.is_file():
        raise fail(path, "file not found (TensorRT-LLM's rank 0 writes it)")
    with guard(path, "meta_info JSON"):
        try:
            meta = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise fail(path, f"not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise fail(path, "is not a JSON object")
        e = _positive_int(path, meta, "num_experts")
        k = _positive_int(path, meta, "num_experts_per_token")
        if k > e:
            raise fail(path, f"num_experts_per_token {k} exceeds num_experts {e}")
        return e, k


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a numpy array (supported dtypes: ``_DTYPES``)."""
    with guard(path, "safetensors file"), open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise fail(path, f"truncated safetensors file ({len(data)} bytes, less than its 8-byte header length)")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise fail(path, f"safetensors header length {n} is too long (at most {MAX_HEADER_BYTES})")
    if 8 + n > len(data):
        raise fail(path, f"truncated safetensors file: header of {n} bytes, file of {len(data)}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(path, f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise fail(path, "safetensors header is not a JSON object")
    buffer = memoryview(data)[8 + n:]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise fail(path, f"tensor {name!r}: header entry is not an object")
        dtype = info.get("dtype")
        if dtype not in _DTYPES:
            raise fail(path, f"tensor {name!r} has dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise fail(path, f"tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise fail(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= len(buffer):
            raise fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] out of bounds of the "
                             f"{len(buffer)}-byte data (truncated file?)")
        dt = np.dtype(_DTYPES[dtype])
        if end - begin != math.prod(shape) * dt.itemsize:
            raise fail(path, f"tensor {name!r}: shape {shape} of {dtype} needs "
                             f"{math.prod(shape) * dt.itemsize} bytes, data_offsets give {end - begin}")
        out[name] = np.frombuffer(buffer[begin:end], dtype=dt).reshape(shape)
    return out


def rank_files(directory: Path) -> list[Path]:
    """``rank{r}.safetensors`` of a directory, by rank; ranks must run 0..R-1 without gaps."""
    try:
        found = {int(m.group(1)): c for c in directory.iterdir() if (m := RANK_FILE.match(c.name))}
    except OSError as exc:
        raise fail(directory, f"cannot list directory: {exc.strerror or exc}") from None
    if not found:
        raise fail(directory, "holds no rank{r}.safetensors files (TensorRT-LLM writes one per rank "
                              "when EXPERT_STATISTIC_ITER_RANGE's last iteration is reached)")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise fail(directory, f"rank{missing[0]}.safetensors is missing (found ranks "
                              f"{', '.join(map(str, sorted(found)))})")
    return [found[r] for r in sorted(found)]


def _add(path: Path, name: str, counts: np.ndarray, num_experts: int, into: np.ndarray | None) -> np.ndarray:
    if counts.shape != (num_experts,):
        raise fail(path, f"tensor {name!r} has shape {list(counts.shape)}, expected [{num_experts}] "
                         f"(meta_info num_experts)")
    if counts.dtype.kind == "f":
        if not np.all(np.isfinite(counts)):
            raise fail(path, f"tensor {name!r} has NaN or infinite counts")
        counts = counts.astype(np.float64)
    else:
        counts = counts.astype(np.int64)
    if counts.size and counts.min() < 0:
        raise fail(path, f"tensor {name!r} has negative counts (min {counts.min():g})")
    if into is None:
        return counts.copy()
    if counts.dtype != into.dtype:
        return into.astype(np.float64) + counts
    into += counts
    return into


def read_trtllm_stats(path: str | os.PathLike[str], model: ModelSpec | None) -> RoutingStats:
    """Load matrix [L, E] of a TensorRT-LLM expert-statistic directory (or its ``meta_info.json``).

    Counts are summed over ranks and iterations. With a model, every layer key must be one of
    ``model.moe_layer_ids`` (absolute decoder-layer indices) and every MoE layer must appear;
    rows follow the MoE ordinals. Without one, the sorted layers seen are the MoE layers.
    ``top_k`` is ``num_experts_per_token``; E and top-k must match the model's.
    """
    directory = stats_dir(path)
    meta_path = directory / META_FILE
    num_experts, top_k = read_meta(meta_path)
    if model is not None and num_experts != model.num_experts:
        raise fail(meta_path, f"num_experts {num_experts} does not match {model.name} "
                              f"({model.num_experts} experts)")
    if model is not None and top_k != model.top_k:
        raise fail(meta_path, f"num_experts_per_token {top_k} does not match {model.name} "
                              f"(top_k={model.top_k})")
    per_layer: dict[int, np.ndarray] = {}
    moe_ids = set(model.moe_layer_ids) if model is not None else None
    for rank_path in rank_files(directory):
        for name, counts in read_safetensors(rank_path).items():
            m = _KEY.match(name)
            if m is None:
                raise fail(rank_path, f"tensor key {name!r} is not '{{iteration}}_{{layer}}'")
            layer = int(m.group(2))
            if moe_ids is not None and layer not in moe_ids:
                assert model is not None
                ids = model.moe_layer_ids
                beyond = (f"; it has {model.num_hidden_layers} decoder layers (a multi-token "
                          "prediction layer?)" if layer >= model.num_hidden_layers else "")
                raise fail(rank_path, f"tensor {name!r}: layer {layer} is not an MoE layer of "
                                      f"{model.name} (MoE decoder layers {ids[0]}..{ids[-1]}{beyond})")
            per_layer[layer] = _add(rank_path, name, counts, num_experts, per_layer.get(layer))
    if not per_layer:  # a rank with no records is fine (nothing to add); all ranks empty is not
        raise fail(directory, "holds no counts: every rank{r}.safetensors holds no tensors")
    if model is not None:
        absent = [i for i in model.moe_layer_ids if i not in per_layer]
        if absent:
            raise fail(directory, f"no counts for MoE decoder layer {absent[0]} of {model.name}"
                                  + (f" (nor {len(absent) - 1} other MoE layers)" if len(absent) > 1 else ""))
        layers = list(model.moe_layer_ids)
    else:
        layers = sorted(per_layer)
    rows = [per_layer[i] for i in layers]
    dtype = np.float64 if any(r.dtype.kind == "f" for r in rows) else np.int64
    load = check_load(directory, np.stack(rows).astype(dtype))
    check_shape(directory, model, load.shape[0], load.shape[1], top_k)
    return load_only_stats(load, top_k, model=model)
