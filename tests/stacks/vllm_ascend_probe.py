"""Run RELEASED vllm-ascend 0.23.0.post1 EPLB code (CPU) on placer's files; print one JSON object.

Run with the stacks venv (never the main one)::

    .venv-stacks/bin/python tests/stacks/vllm_ascend_probe.py ADDITIONAL_CONFIG_JSON --experts E \\
        --ep-size G [--tp-size T] [--layers L]

The sdist cannot be built here (it needs Ascend's toolchain), so its modules are loaded by file
from the unpacked release (``.venv-stacks/src/vllm_ascend-0.23.0.post1``, fetched and
sha256-checked by tests/stacks/stacks.mk), without the package ``__init__`` (which imports
``torch_npu``):

* ``vllm_ascend/ascend_config.py``: ``EplbConfig(additional_config["eplb_config"])``, the
  parser and validator vllm-ascend runs on ``--additional-config``;
* ``vllm_ascend/eplb/core/eplb_utils.py``: ``init_eplb_config`` for every (MoE layer, EP rank)
  with the ``moe_config`` fields it reads (``num_experts``, ``ep_size``, ``ep_rank``) and
  ``tp_size`` as ``AscendFusedMoE`` passes it (``parallel_config.tensor_parallel_size``).

Both import vLLM (0.34.0 from the stacks venv) for its logger, ``cdiv`` and
``determine_expert_map``. Stub: ``torch.Tensor.npu`` is the identity (the one NPU call, moving
``log2phy`` to the device). Nothing else is faked.

Output: ``{"accepted": bool, "error": str | null, "config": {...}, "n_redundant": [per layer],
"expert_map": [L][G][E] (local slot or -1), "log2phy": [L][G][E] (physical slot each rank sends
each logical expert to), "mtp": {"n_redundant": int} (the layer numbered moe_layer_count)}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / ".venv-stacks" / "src" / "vllm_ascend-0.23.0.post1" / "vllm_ascend"


def _load(name: str, relative: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, SRC / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("additional_config")
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--ep-size", type=int, required=True)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--layers", type=int, default=None)
    args = ap.parse_args()

    import torch

    torch.Tensor.npu = lambda self: self  # the one NPU call (log2phy to the device)
    ascend_config = _load("vllm_ascend_ascend_config", "ascend_config.py")
    eplb_utils = _load("vllm_ascend_eplb_utils", "eplb/core/eplb_utils.py")
    out: dict = {"accepted": False, "error": None}
    try:
        additional = json.loads(args.additional_config)
        config = ascend_config.EplbConfig(additional.get("eplb_config", {}))
        out["config"] = dict(config.config)
        with open(config.expert_map_path) as f:
            layers = json.load(f)["moe_layer_count"] if args.layers is None else args.layers
        maps, log2phy, redundant = [], [], []
        for layer in range(layers):
            per_rank_map, per_rank_l2p = [], []
            for rank in range(args.ep_size):
                moe = types.SimpleNamespace(num_experts=args.experts, ep_size=args.ep_size, ep_rank=rank)
                _, local_map, l2p, n_red = eplb_utils.init_eplb_config(config, layer, moe, tp_size=args.tp_size)
                per_rank_map.append(local_map.tolist())
                per_rank_l2p.append(l2p.tolist())
            maps.append(per_rank_map)
            log2phy.append(per_rank_l2p)
            redundant.append(int(n_red))
        moe = types.SimpleNamespace(num_experts=args.experts, ep_size=args.ep_size, ep_rank=0)
        mtp = eplb_utils.init_eplb_config(config, layers, moe, tp_size=args.tp_size)
        out.update(accepted=True, expert_map=maps, log2phy=log2phy, n_redundant=redundant,
                   mtp={"n_redundant": int(mtp[3])})
    except Exception as exc:  # vllm-ascend's answer, reported
        out["error"] = f"{type(exc).__name__}: {exc}"
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
