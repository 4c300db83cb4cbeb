"""Run RELEASED vLLM 0.34.0 code (CPU only) against placer's inputs; print one JSON object.

Run with the stacks venv (never the main one)::

    .venv-stacks/bin/python tests/stacks/vllm_probe.py eplb-config '{"num_redundant_experts": 8}'
    .venv-stacks/bin/python tests/stacks/vllm_probe.py flags [--experts E] -- \\
        --tensor-parallel-size 8 --enable-expert-parallel --enable-eplb \\
        --eplb-config '{"num_redundant_experts": 8}'
    .venv-stacks/bin/python tests/stacks/vllm_probe.py initial-map --experts E --redundant R \\
        --ep-size G --layers L
    .venv-stacks/bin/python tests/stacks/vllm_probe.py r3-encode IN.npy [--num-experts E]

``eplb-config``: ``vllm.config.EPLBConfig(**json)`` (pydantic, ``extra="forbid"``). Output
``{"accepted": true, "config": {field: value}}`` or ``{"accepted": false, "error": "..."}``.

``flags``: ``EngineArgs.add_cli_args(FlexibleArgumentParser())`` (the engine half of ``vllm
serve``'s parser) parses the flags, then ``EngineArgs.from_cli_args`` (which turns a
``--eplb-config`` dict into ``EPLBConfig``). Then ``ParallelConfig(...)`` is built from the
parsed engine args (its validator checks ``--enable-eplb`` needs ``--enable-expert-parallel``
and TP x PCP x DP > 1, and that ``num_redundant_experts`` needs EPLB), and with ``--experts E``
``ParallelConfig.compute_eplb_num_redundant_experts(E)`` fills an unset R. Output::

    {"accepted": bool, "stage": "parse" | "parallel_config" | null, "error": str | null,
     "enable_eplb", "enable_expert_parallel", "tensor_parallel_size", "data_parallel_size",
     "prefill_context_parallel_size", "ep_size", "eplb_config": {...}, "parallel_config":
     {"eplb_config": {...}} | null}

``initial-map``: runs the release's ``EplbState.add_model`` (its own
``build_initial_global_physical_to_logical_map`` and inline logical->physical loop, then the
per-layer expand) on a duck-typed model whose ``set_eplb_state`` captures the maps vLLM hands
the model and then stops ``add_model`` (what follows needs an EP process group and expert
weights). Also runs ``compute_logical_maps`` (what vLLM uses after every rebalance) on the same
physical->logical map. Output ``{"physical_to_logical": [L][P], "logical_to_physical": [L][E][X]
(-1 padded, X = R + 1 as vLLM allocates it), "logical_replica_count": [L][E],
"compute_logical_maps": {"logical_to_physical", "logical_replica_count"}, "slots_per_rank": P/G}``.

``r3-encode``: ``vllm.utils.serial_utils.numpy2base64`` (what the OpenAI completion/chat
servers call on ``output.routed_experts``) on the array of IN.npy, after casting it the way
``RoutedExpertsCapturer.snapshot_routing_data`` does (``uint8`` if num_experts <= 256 else
``uint16``; ``--num-experts`` defaults to max id + 1; ``--keep-dtype`` skips the cast). Output
``{"dtype": "uint8", "routed_experts": "<base64>", "shape": [...]}``.

Exit status 0 whenever vLLM answered (accepted or not), 1 on a harness bug.

Stubs and shims (nothing else is faked; every vLLM module on the path is the released code;
nothing is stubbed in ``sys.modules``):

* ``VLLM_TARGET_DEVICE=cpu`` is set (vLLM's own switch) so ``current_platform`` is the CPU
  platform; otherwise ``DeviceConfig`` cannot infer a device and ``EngineArgs.add_cli_args``
  fails.
* ``flags`` only: ``current_platform.is_cuda_alike`` returns True while ``ParallelConfig`` is
  built, since its validator refuses EPLB on CPU ("only supported on CUDA ... devices"). Every
  other check of that validator runs as released.
* ``initial-map`` only: the model is a duck-typed object with the attributes ``add_model`` reads
  (``num_routed_experts``, ``num_redundant_experts``, ``num_physical_experts``,
  ``num_logical_experts``, ``num_expert_groups``, ``num_moe_layers``,
  ``num_local_physical_experts``) and a ``set_eplb_state`` that records and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import traceback

os.environ["VLLM_TARGET_DEVICE"] = "cpu"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def _config_dict(cfg) -> dict:
    import dataclasses
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def cmd_eplb_config(text: str) -> dict:
    from vllm.config import EPLBConfig

    try:
        doc = json.loads(text)
        cfg = EPLBConfig(**doc)
    except Exception as exc:  # noqa: BLE001 - vLLM's answer, reported
        return {"accepted": False, "error": _err(exc)}
    return {"accepted": True, "config": _config_dict(cfg)}


def cmd_flags(flags: list[str], experts: int | None) -> dict:
    from vllm.config import ParallelConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm serve"))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = parser.parse_args(flags)
            ea = EngineArgs.from_cli_args(ns)
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith(" ")]
        msg = next((ln for ln in lines if "error:" in ln), lines[-1] if lines else "parse failed")
        detail = " ".join(err.getvalue().split("error:", 1)[-1].split())
        return {"accepted": False, "stage": "parse", "error": detail or msg}
    except Exception as exc:  # noqa: BLE001
        return {"accepted": False, "stage": "parse", "error": _err(exc)}
    out = {
        "accepted": True, "stage": None, "error": None,
        "enable_eplb": ea.enable_eplb, "enable_expert_parallel": ea.enable_expert_parallel,
        "tensor_parallel_size": ea.tensor_parallel_size, "data_parallel_size": ea.data_parallel_size,
        "prefill_context_parallel_size": ea.prefill_context_parallel_size,
        "ep_size": ea.tensor_parallel_size * ea.data_parallel_size * ea.prefill_context_parallel_size,
        "eplb_config": _config_dict(ea.eplb_config), "parallel_config": None,
    }
    import copy
    saved = current_platform.is_cuda_alike
    current_platform.is_cuda_alike = lambda: True  # shim: EPLB is refused on CPU (see docstring)
    try:
        pc = ParallelConfig(
            tensor_parallel_size=ea.tensor_parallel_size, data_parallel_size=ea.data_parallel_size,
            prefill_context_parallel_size=ea.prefill_context_parallel_size,
            enable_expert_parallel=ea.enable_expert_parallel, enable_eplb=ea.enable_eplb,
            eplb_config=copy.deepcopy(ea.eplb_config))
        if experts is not None:
            pc.compute_eplb_num_redundant_experts(experts)
    except Exception as exc:  # noqa: BLE001
        out.update(accepted=False, stage="parallel_config", error=_err(exc))
        return out
    finally:
        current_platform.is_cuda_alike = saved
    out["parallel_config"] = {"eplb_config": _config_dict(pc.eplb_config)}
    return out


class _Stop(Exception):
    pass


class _Model:
    """Duck-typed MixtureOfExperts: the attributes EplbState.add_model reads."""

    def __init__(self, experts: int, redundant: int, ep_size: int, layers: int):
        self.num_routed_experts = self.num_logical_experts = experts
        self.num_redundant_experts = redundant
        self.num_physical_experts = experts + redundant
        self.num_local_physical_experts = (experts + redundant) // ep_size
        self.num_expert_groups = 1
        self.num_moe_layers = layers
        self.captured = None

    def set_eplb_state(self, expert_load_pass, logical_to_physical_map, logical_replica_count):
        self.captured = (logical_to_physical_map.clone(), logical_replica_count.clone())
        raise _Stop


def cmd_initial_map(experts: int, redundant: int, ep_size: int, layers: int) -> dict:
    import torch
    from vllm.config import EPLBConfig, ParallelConfig
    from vllm.distributed.eplb.eplb_state import EplbState, compute_logical_maps

    state = EplbState(ParallelConfig(eplb_config=EPLBConfig(use_async=False)), torch.device("cpu"))
    model = _Model(experts, redundant, ep_size, layers)
    try:
        state.add_model(model, model_config=None)
    except _Stop:
        pass
    if model.captured is None:
        raise RuntimeError("add_model did not reach set_eplb_state")
    l2p, cnt = model.captured
    p2l = EplbState.build_initial_global_physical_to_logical_map(experts, redundant)
    p2l_layers = torch.tensor([list(p2l)] * layers)
    cl2p, ccnt = compute_logical_maps(p2l_layers, experts)
    return {"physical_to_logical": p2l_layers.tolist(), "logical_to_physical": l2p.tolist(),
            "logical_replica_count": cnt.tolist(),
            "compute_logical_maps": {"logical_to_physical": cl2p.tolist(),
                                     "logical_replica_count": ccnt.tolist()},
            "slots_per_rank": (experts + redundant) / ep_size}


def cmd_r3_encode(path: str, num_experts: int | None, keep_dtype: bool) -> dict:
    import numpy as np
    from vllm.utils.serial_utils import numpy2base64

    arr = np.load(path, allow_pickle=False)
    if not keep_dtype:
        e = num_experts if num_experts is not None else int(arr.max()) + 1
        # RoutedExpertsCapturer.__init__: "uint8" if num_experts <= 256 else "uint16"
        arr = arr.astype("uint8" if e <= 256 else "uint16")
    return {"dtype": str(arr.dtype), "shape": list(arr.shape), "routed_experts": numpy2base64(arr)}


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="vllm_probe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("eplb-config")
    p.add_argument("json")
    p = sub.add_parser("flags")
    p.add_argument("--experts", type=int, default=None)
    p = sub.add_parser("initial-map")
    for name in ("--experts", "--redundant", "--ep-size", "--layers"):
        p.add_argument(name, type=int, required=True)
    p = sub.add_parser("r3-encode")
    p.add_argument("path")
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--keep-dtype", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "eplb-config":
            out = cmd_eplb_config(args.json)
        elif args.cmd == "flags":
            out = cmd_flags(extra, args.experts)
        elif args.cmd == "initial-map":
            out = cmd_initial_map(args.experts, args.redundant, args.ep_size, args.layers)
        else:
            out = cmd_r3_encode(args.path, args.num_experts, args.keep_dtype)
    except Exception:  # noqa: BLE001 - a harness bug
        traceback.print_exc()
        return 1
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
