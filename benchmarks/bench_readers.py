"""Peak memory of ``placer stats`` on one large trace in each input format that is read incrementally.

Writes a synthetic DeepSeek-V3 trace (``placer synth``, native ``.npz``), then the same tokens as
an R3 ``.npy`` (int32 ``[tokens, 61 hidden layers, 8]``, dense rows 0), a Parquet trace written as
ONE row group, an SGLang ``per_token`` dump (``.pt``, records of 8192 tokens, identity
physical-to-logical map) and R3 base64 text (one line per 4096-token request), and runs
``placer stats FILE --model deepseek-v3`` on each. Reports each command's wall time and peak
resident memory (``ru_maxrss`` of the command, read from a wrapper process) side by side.

    python benchmarks/bench_readers.py                         # 1 M tokens, every format
    python benchmarks/bench_readers.py --tokens 200000 --formats npy,parquet
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from placer.io import read_input, write_trace_parquet
from placer.presets import get_model
from placer.types import RoutingTrace

MODEL = "deepseek-v3"
FORMATS = ("npz", "npy", "parquet", "pt", "b64")
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def measure(argv: list[str]) -> tuple[float, float]:
    """``(wall seconds, peak RSS MiB)`` of one command run in a fresh wrapper process."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, int(done.stdout.split()[-1]) / 1024.0  # ru_maxrss is KiB on Linux


def _chunks(npz: Path, tokens: int) -> Iterator[RoutingTrace]:
    inp = read_input(npz, chunk_tokens=tokens, gate_weights=False)
    assert inp.chunks is not None
    yield from inp.chunks()


def _full_layers(chunk: RoutingTrace, fill: int) -> np.ndarray:
    """int32 ``[t, num_hidden_layers, K]``: the MoE rows at their layer ids, ``fill`` in dense rows."""
    m = chunk.model
    assert m is not None
    out = np.full((chunk.num_tokens, m.num_hidden_layers, m.top_k), fill, np.int32)
    out[:, list(m.moe_layer_ids)] = chunk.expert_ids
    return out


def write_npy(npz: Path, out: Path, tokens: int) -> None:
    m = get_model(MODEL)
    with open(out, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False,
                                                 "shape": (tokens, m.num_hidden_layers, m.top_k)})
        for chunk in _chunks(npz, 65536):
            f.write(_full_layers(chunk, 0).tobytes())


def write_parquet(npz: Path, out: Path, tokens: int) -> None:
    inp = read_input(npz, chunk_tokens=tokens, gate_weights=False)  # the whole trace: one row group
    assert inp.chunks is not None
    write_trace_parquet(out, inp.chunks(), row_group_tokens=tokens)


def write_pt(npz: Path, out: Path) -> None:
    import torch

    m = get_model(MODEL)
    records = [{"forward_pass_id": i, "rank": 0, "gatherer_key": "primary", "forward_mode": 1,
                "topk_ids_of_layer": torch.from_numpy(np.ascontiguousarray(_full_layers(c, -1).transpose(1, 0, 2)))}
               for i, c in enumerate(_chunks(npz, 8192))]
    p2l = torch.arange(m.num_experts).repeat(m.num_hidden_layers, 1)
    torch.save({"records": records, "last_physical_to_logical_map": p2l}, out)


def write_b64(npz: Path, out: Path) -> None:
    with open(out, "w", encoding="ascii") as f:
        for chunk in _chunks(npz, 4096):
            f.write(base64.b64encode(_full_layers(chunk, 0).astype("<i4").tobytes()).decode() + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    if unknown := set(formats) - set(FORMATS):
        raise SystemExit(f"unknown formats: {', '.join(sorted(unknown))}")
    placer = [sys.executable, "-m", "placer"]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        npz = work / "trace.npz"
        t0 = time.perf_counter()
        subprocess.run([*placer, "synth", "--model", MODEL, "--tokens", str(args.tokens), "-o", str(npz), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        files = {"npz": npz, "npy": work / "routed.npy", "parquet": work / "trace.parquet",
                 "pt": work / "expert_distribution_recorder_0_0.pt", "b64": work / "routed.b64"}
        writers = {"npy": lambda: write_npy(npz, files["npy"], args.tokens),
                   "parquet": lambda: write_parquet(npz, files["parquet"], args.tokens),
                   "pt": lambda: write_pt(npz, files["pt"]), "b64": lambda: write_b64(npz, files["b64"])}
        for f in formats:
            if f in writers:
                writers[f]()
        print(f"# {args.tokens:,} tokens of {MODEL}; files written in {time.perf_counter() - t0:.0f} s")
        print(f"{'format':<10} {'file':>10} {'wall s':>8} {'peak RSS MiB':>13}")
        for f in formats:
            path = files[f]
            wall, peak = measure([*placer, "stats", str(path), "--model", MODEL, "--quiet"])
            print(f"{f:<10} {os.path.getsize(path) / 2**30:>8.2f}GB {wall:>8.1f} {peak:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
