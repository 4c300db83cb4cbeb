"""Run RELEASED SGLang 0.5.23 code (CPU only) against placer's inputs; print one JSON object.

Run with the stacks venv (never the main one)::

    .venv-stacks/bin/python tests/stacks/sglang_probe.py metadata \\
        --model-config tests/stacks/configs/deepseek-v3.json -- \\
        --tp-size 16 --ep-size 16 --moe-a2a-backend deepep --ep-dispatch-algorithm static \\
        --ep-num-redundant-experts 32 --init-expert-location placement.json

    .venv-stacks/bin/python tests/stacks/sglang_probe.py record --mode per_token \\
        --model-config tests/stacks/configs/qwen3-30b-a3b.json --topk-ids ids.npy \\
        --out-dir DIR [--physical-to-logical-map p2l.npy] [--forward-modes 1,2] [--rank 0] \\
        [-- extra sglang server flags]

``metadata``: ``sglang.srt.server_args.prepare_server_args(flags)`` then
``ServerArgs.resolve_once()`` and ``check_server_args()`` (what ``Engine`` does before it
spawns schedulers), then for every TP rank ``runtime_context.publish(server_args,
role="scheduler", ranks=SpawnRanks(world_rank=spawn_world_rank(..), gpu_id=rank))`` (what
``run_scheduler_process`` does), ``ModelConfig.from_server_args`` (what the scheduler/TP worker
does) and ``compute_initial_expert_location_metadata(model_config, get_parallel().moe_ep_rank)``
(what ``ModelRunner.maybe_init_expert_location_metadata`` does). ``--model-path`` (a temp dir
holding the given config as config.json), ``--device cpu`` and ``--skip-tokenizer-init`` are
added when the flags lack them. Output::

    {"accepted": true, "ep_size": G, "num_layers": L, "num_physical_experts": P,
     "num_logical_experts": E, "physical_to_logical_map": [L][P],
     "logical_to_all_physical_map": [rank][L][E][X] (-1 padded; X = the largest number of
         valid entries; SGLang itself pads further, to P),
     "num_valid": [rank][L][E], "rank_dispatch": [rank][L][E] | null,
     "ep_dispatch_algorithm": ..., "moe_a2a_backend": ..., "tp_size", "nnodes", "seconds"}
    {"accepted": false, "stage": "prepare_server_args" | "metadata",
     "step": "parse" | "resolve" | "check" | "publish" | "model_config" | "compute",
     "error": "<ExceptionType>: <message>"}

``record``: builds the server args the same way with ``--expert-distribution-recorder-mode
MODE``, the metadata of ``--rank``, then SGLang's own ``ExpertDistributionRecorder.init_new``
(its gatherer + accumulator) and drives it like the model does: ``start_record``, per pass
``with_forward_pass`` (a minimal forward-batch object: input_ids, positions,
extend_seq_lens_cpu, forward_mode), per layer ``with_current_layer`` + ``on_select_experts``,
then ``stop_record`` and ``dump_record`` (writes into ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``
= ``--out-dir``). ``--topk-ids``: .npy int [passes, layers, tokens, topk] of PHYSICAL ids
(layers = num_hidden_layers; -1 = no expert, e.g. dense layers), or [layers, tokens, topk]
for one pass. ``--physical-to-logical-map``: .npy int [layers, P]; given, it is saved as a .pt
``{"physical_to_logical_map": tensor}`` and passed as ``--init-expert-location`` with
``--ep-num-redundant-experts P - E``. ``stat`` mode all-reduces over torch.distributed, so a
1-process gloo group is initialised. Output ``{"paths": [...], "mode", "num_layers",
"num_physical_experts", "seconds"}``.

Exit status 0 whenever SGLang answered (accepted or not), 1 on a harness bug.

Stubs and shims (nothing else is faked; every SGLang module on the path is the released code):

* ``torchvision`` (+ ``.transforms``, ``.transforms.functional``, ``.transforms.v2``,
  ``.transforms.v2.functional``, ``.io``): a module stub. ``sglang.srt.configs`` imports
  ``nano_nemotron_vl`` -> ``sglang.srt.multimodal.internvl_utils``, which imports torchvision at
  module level for image preprocessing; never called on our path. PyPI has no CPU build of
  torchvision 0.28 (the torch 2.13 match): its ``_C.so`` links ``libtorch_cuda``/``libc10_cuda``
  and its import crashes with CPU torch. transformers' ``is_torchvision_available()`` is
  evaluated (False, cached) before the stub is installed, so transformers never uses it.
* ``sglang.srt.eplb.expert_distribution.get_device`` (the name imported there from
  ``sglang.srt.utils``): replaced in that module only by ``lambda device_id=None: "cpu"``
  (``record`` only). ``_LayerBasedGpuSinglePassGatherer`` (per_pass / stat) allocates its count
  buffer on it, and the accelerator probe raises "No accelerator (CUDA, XPU, HPU, NPU, MUSA,
  MPS) or platform plugin is available." on a CPU-only host.
* ``torch.cpu.empty_cache``: a no-op added when missing (CPU torch has none);
  ``_StatAccumulator.dump`` calls ``torch.get_device_module().empty_cache()`` on first dump.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import io
import json
import os
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

_T0 = time.perf_counter()


# --------------------------------------------------------------------------- stubs

class _Dummy:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        raise RuntimeError("stubbed torchvision object called (see sglang_probe.py docstring)")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy()

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy()


def _stub(name: str) -> None:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        n = ".".join(parts[:i])
        if n not in sys.modules:
            m = _StubModule(n)
            m.__spec__ = importlib.machinery.ModuleSpec(n, None)
            m.__path__ = []
            m.__version__ = "0.0.0+stub"
            sys.modules[n] = m
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], m)


def install_stubs() -> None:
    try:
        import torchvision  # noqa: F401  (a working real one wins)
        return
    except Exception:
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
    from transformers.utils import import_utils

    # cache transformers' answer (False) before the stub could change it
    assert not import_utils.is_torchvision_available()
    for n in ("torchvision.transforms.v2.functional", "torchvision.transforms.functional",
              "torchvision.io"):
        _stub(n)


def install_cpu_shims() -> None:
    import torch

    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None


def _shim_recorder_device() -> None:
    """expert_distribution's GPU gatherers size their count buffer on
    ``sglang.srt.utils.get_device()``, an accelerator probe that raises on a CPU-only host
    (the CPU platform's ``get_device`` is unimplemented). Only that module's reference is
    replaced, answering "cpu"."""
    import sglang.srt.eplb.expert_distribution as ed

    ed.get_device = lambda device_id=None: "cpu"


# --------------------------------------------------------------------------- helpers

class Rejected(Exception):
    def __init__(self, stage: str, step: str, exc: BaseException | str):
        self.stage, self.step = stage, step
        self.error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"


def _load_config(spec: str) -> dict:
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    return json.loads(p.read_text())


def _has_flag(flags: list[str], name: str) -> bool:
    return any(f == name or f.startswith(name + "=") for f in flags)


def _flag_value(flags: list[str], name: str):
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            return flags[i + 1]
        if f.startswith(name + "="):
            return f.split("=", 1)[1]
    return None


def _complete_flags(flags: list[str], model_config: str | None, tmp: str) -> list[str]:
    flags = list(flags)
    if not _has_flag(flags, "--model-path"):
        if model_config is None:
            raise SystemExit("need --model-config or --model-path in the SGLang flags")
        d = Path(tmp) / "model"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(_load_config(model_config)))
        flags = ["--model-path", str(d)] + flags
    if not _has_flag(flags, "--device"):
        flags += ["--device", "cpu"]
    if not _has_flag(flags, "--skip-tokenizer-init"):
        flags += ["--skip-tokenizer-init"]
    return flags


def prepare(flags: list[str]):
    """prepare_server_args + resolve_once + check_server_args, as Engine does."""
    from sglang.srt.server_args import prepare_server_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            sa = prepare_server_args(flags)
    except SystemExit as e:  # argparse
        msg = err.getvalue().strip().splitlines()
        raise Rejected("prepare_server_args", "parse",
                       f"SystemExit: {msg[-1] if msg else e.code}") from None
    except Exception as e:
        raise Rejected("prepare_server_args", "parse", e) from e
    try:
        sa.resolve_once()
    except Exception as e:
        raise Rejected("prepare_server_args", "resolve", e) from e
    try:
        sa.check_server_args()
    except Exception as e:
        raise Rejected("prepare_server_args", "check", e) from e
    return sa


def publish_rank(sa, tp_rank: int) -> None:
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank

    try:
        publish(sa, role="scheduler",
                ranks=SpawnRanks(world_rank=spawn_world_rank(sa, tp_rank=tp_rank, pp_rank=0),
                                 dp_rank=None, gpu_id=tp_rank))
    except Exception as e:
        raise Rejected("metadata", "publish", e) from e


def model_config_of(sa):
    from sglang.srt.configs.model_config import ModelConfig

    try:
        return ModelConfig.from_server_args(sa)
    except Exception as e:
        raise Rejected("metadata", "model_config", e) from e


def metadata_of(sa, mc):
    from sglang.srt.eplb.expert_location import compute_initial_expert_location_metadata
    from sglang.srt.runtime_context import get_exec, get_parallel

    p = get_parallel()
    rank = p.moe_ep_rank + (p.ep_join_rank_offset if get_exec().moe.is_ep_scale_joiner else 0)
    try:
        md = compute_initial_expert_location_metadata(model_config=mc, moe_ep_rank=rank)
    except Exception as e:
        raise Rejected("metadata", "compute", e) from e
    if md is None:
        arch = ",".join(getattr(mc.hf_config, "architectures", None) or ["?"])
        raise Rejected("metadata", "compute",
                       f"NoExpertLocationConfig: no expert-location config for {arch} "
                       "(compute_initial_expert_location_metadata returned None: the model class "
                       "has no get_model_config_for_expert_location)")
    return rank, md


# --------------------------------------------------------------------------- commands

def cmd_metadata(args, flags: list[str]) -> dict:
    from sglang.srt.runtime_context import get_exec, get_parallel

    with tempfile.TemporaryDirectory() as tmp:
        flags = _complete_flags(flags, args.model_config, tmp)
        sa = prepare(flags)
        tp_size = sa.tp_size
        mc = None
        per_rank: dict[int, object] = {}
        for tp_rank in range(tp_size):
            publish_rank(sa, tp_rank)
            if mc is None:
                mc = model_config_of(sa)
            ep_rank = get_parallel().moe_ep_rank
            if ep_rank in per_rank:
                continue  # moe_tp > 1: same EP rank, same metadata
            _, md = metadata_of(sa, mc)
            per_rank[ep_rank] = md
        moe = get_exec().moe
        ranks = sorted(per_rank)
        mds = [per_rank[r] for r in ranks]
        md0 = mds[0]
        nv = [md.logical_to_all_physical_map_num_valid.cpu() for md in mds]
        x = max(1, max(int(n.max()) for n in nv))
        out = {
            "accepted": True,
            "ep_size": md0.ep_size,
            "tp_size": tp_size,
            "nnodes": get_parallel().nnodes,
            "ep_ranks": ranks,
            "num_layers": md0.num_layers,
            "num_physical_experts": md0.num_physical_experts,
            "num_logical_experts": md0.num_logical_experts,
            "physical_to_logical_map": md0.physical_to_logical_map_cpu.tolist(),
            "logical_to_all_physical_map": [md.logical_to_all_physical_map_cpu[..., :x].tolist()
                                            for md in mds],
            "num_valid": [n.tolist() for n in nv],
            "rank_dispatch": (None if md0.logical_to_rank_dispatch_physical_map is None else
                              [md.logical_to_rank_dispatch_physical_map.cpu().tolist() for md in mds]),
            "ep_dispatch_algorithm": moe.ep_dispatch_algorithm,
            "moe_a2a_backend": moe.moe_a2a_backend,
            "ep_num_redundant_experts": moe.ep_num_redundant_experts,
            "init_expert_location": moe.init_expert_location,
        }
        if any(not md.physical_to_logical_map_cpu.equal(md0.physical_to_logical_map_cpu) for md in mds):
            out["physical_to_logical_map_per_rank"] = [md.physical_to_logical_map_cpu.tolist() for md in mds]
        return out


def cmd_record(args, flags: list[str]) -> dict:
    import numpy as np
    import torch

    ids = np.load(args.topk_ids)
    if ids.ndim == 3:
        ids = ids[None]
    if ids.ndim != 4:
        raise SystemExit(f"--topk-ids must be [passes, layers, tokens, topk], got {list(ids.shape)}")
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"] = str(out_dir)
    before = set(out_dir.glob("*.pt"))
    with tempfile.TemporaryDirectory() as tmp:
        flags = list(flags) + ["--expert-distribution-recorder-mode", args.mode]
        if args.physical_to_logical_map:
            p2l = np.load(args.physical_to_logical_map).astype(np.int64)
            e = _num_experts(_load_config(args.model_config)) if args.model_config else int(p2l.max()) + 1
            f = Path(tmp) / "placement.pt"
            torch.save({"physical_to_logical_map": torch.from_numpy(p2l)}, f)
            flags += ["--init-expert-location", str(f)]
            if not _has_flag(flags, "--ep-num-redundant-experts"):
                flags += ["--ep-num-redundant-experts", str(p2l.shape[1] - e)]
        flags = _complete_flags(flags, args.model_config, tmp)
        sa = prepare(flags)
        if args.mode == "stat" and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                "gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        tp_rank = args.rank  # EP rank == TP rank when moe_tp == moe_dp == 1
        publish_rank(sa, tp_rank)
        mc = model_config_of(sa)
        rank, md = metadata_of(sa, mc)

        from sglang.srt.eplb.expert_distribution import (
            ExpertDistributionRecorder,
            set_global_expert_distribution_recorder,
        )
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        if ids.shape[1] != md.num_layers:
            raise SystemExit(f"--topk-ids has {ids.shape[1]} layers, SGLang's metadata {md.num_layers}")
        _shim_recorder_device()
        recorder = ExpertDistributionRecorder.init_new(md, rank=rank)
        set_global_expert_distribution_recorder(recorder)
        modes = [int(m) for m in args.forward_modes.split(",")] if args.forward_modes else [1]
        recorder.start_record()
        for i in range(ids.shape[0]):
            t = ids.shape[2]
            batch = types.SimpleNamespace(
                input_ids=torch.zeros(t, dtype=torch.int64),
                positions=torch.arange(t, dtype=torch.int64),
                extend_seq_lens_cpu=[t],
                forward_mode=ForwardMode(modes[i % len(modes)]),
                extend_num_tokens=t,
                is_extend_in_batch=True,
            )
            with recorder.with_forward_pass(i, batch):
                for layer in range(ids.shape[1]):
                    layer_ids = ids[i, layer]
                    if (layer_ids < 0).all():
                        continue  # dense layer: the model never calls select_experts there
                    with recorder.with_current_layer(layer):
                        recorder.on_select_experts(torch.from_numpy(layer_ids.astype(np.int32)))
        recorder.stop_record()
        recorder.dump_record(output_mode="file")
    paths = sorted(str(p) for p in set(out_dir.glob("*.pt")) - before)
    return {"paths": paths, "mode": args.mode, "rank": rank, "num_layers": md.num_layers,
            "num_physical_experts": md.num_physical_experts,
            "num_logical_experts": md.num_logical_experts}


def _num_experts(cfg: dict) -> int:
    for k in ("n_routed_experts", "num_experts", "num_local_experts"):
        if cfg.get(k):
            return int(cfg[k])
    raise SystemExit("cannot tell the number of experts from the config")


# --------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    if "--" in argv:
        i = argv.index("--")
        argv, flags = argv[:i], argv[i + 1:]
    else:
        flags = []
    ap = argparse.ArgumentParser(prog="sglang_probe.py")
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("metadata")
    m.add_argument("--model-config", help="HF config.json file or a directory holding one")
    r = sub.add_parser("record")
    r.add_argument("--mode", required=True, choices=["per_token", "per_pass", "stat"])
    r.add_argument("--model-config", required=True)
    r.add_argument("--topk-ids", required=True)
    r.add_argument("--out-dir", required=True)
    r.add_argument("--physical-to-logical-map")
    r.add_argument("--forward-modes", help="comma list of ForwardMode ints per pass (cycled); 1=EXTEND 2=DECODE")
    r.add_argument("--rank", type=int, default=0)
    args = ap.parse_args(argv)

    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # SGLang logs/prints must not reach our JSON
    try:
        install_stubs()
        install_cpu_shims()
        try:
            result = (cmd_metadata if args.command == "metadata" else cmd_record)(args, flags)
        except Rejected as rej:
            result = {"accepted": False, "stage": rej.stage, "step": rej.step, "error": rej.error}
        result["seconds"] = round(time.perf_counter() - _T0, 2)
    except SystemExit as e:
        sys.stdout = real_stdout
        print(json.dumps({"harness_error": str(e.code)}))
        return 1
    except BaseException:
        traceback.print_exc()
        sys.stdout = real_stdout
        print(json.dumps({"harness_error": traceback.format_exc(limit=3)}))
        return 1
    sys.stdout = real_stdout
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
