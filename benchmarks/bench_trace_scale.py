"""Production-size traces: wall time and peak memory of every trace command against the token count.

    python benchmarks/bench_trace_scale.py [--tokens 200000,1000000,5000000] [--repeat N] [--baseline TREE]
                                           [--dir DIR] [--keep] [--reuse] [--output FILE]

For each token count, writes a synthetic DeepSeek-V3 trace (58 MoE layers, E=256, top-8) with
``placer synth`` (streamed to the .npz, never held whole), then runs, each in its own process:

- ``placer stats trace.npz -o stats.npz``
- ``placer solve stats.npz --gpus 64 --nodes 8 --redundant 64 --method eplb``
- ``placer solve trace.npz ...`` (same flags: statistics, solve, then scores streamed)
- ``placer evaluate p.json trace.npz``

and reports each command's wall time, peak resident memory (``ru_maxrss`` of the command, read
by a wrapper process that runs nothing else) and rate in million token-expert pairs per second
(tokens x layers x top_k / wall), beside the statistics kernel's rate (``StatsBuilder.update``
on one in-memory chunk, no file reading). Prints a markdown table; ``--output`` also writes it.
Memory flat and time linear in the token count is what the table should show.

``--repeat N`` runs every command (but synth) N times and reports the median wall time and the
largest peak. ``--baseline TREE`` (another checkout of placer, e.g. ``git worktree add
/tmp/base HEAD``) also runs every command but synth with ``PYTHONPATH=TREE``, on the same
files, alternating with this tree's run, and adds its median and rate beside this tree's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from placer.presets import get_model

MODEL = "deepseek-v3"
CLUSTER = ("--gpus", "64", "--nodes", "8", "--redundant", "64")
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def commands(workdir: Path) -> list[tuple[str, list[str]]]:
    """``(label, argv after "placer")`` of the commands measured, in order (each needs the ones before)."""
    trace, stats = str(workdir / "trace.npz"), str(workdir / "stats.npz")
    return [
        ("synth", ["synth", "--model", MODEL, "--tokens", "{tokens}", "-o", trace]),
        ("stats", ["stats", trace, "-o", stats]),
        ("solve STATS --method eplb", ["solve", stats, *CLUSTER, "--method", "eplb", "-o", str(workdir / "p.json")]),
        ("solve TRACE --method eplb", ["solve", trace, *CLUSTER, "--method", "eplb",
                                       "-o", str(workdir / "pt.json")]),
        ("evaluate", ["evaluate", str(workdir / "p.json"), trace]),
    ]


def measure(argv: list[str], pythonpath: str | None = None) -> tuple[float, float]:
    """``(wall seconds, peak resident MiB)`` of one command run in a fresh wrapper process
    (with ``PYTHONPATH=pythonpath`` when given: another placer tree)."""
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK, *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return wall, int(done.stdout.split()[-1]) / 1024.0  # ru_maxrss is KiB on Linux


def kernel_rate(tokens: int = 65536) -> float:
    """Million token-expert pairs per second of ``StatsBuilder.update`` on one in-memory chunk."""
    from placer.stats import StatsBuilder  # deferred: the parent process needs no numba otherwise
    from placer.synthetic import synthesize

    model = get_model(MODEL)
    chunk = next(synthesize(model, tokens, seed=0))
    warm = StatsBuilder(model.num_moe_layers, model.num_experts, model.top_k, model=model)
    warm.update(chunk)  # compile (or load from cache) outside the timing
    builder = StatsBuilder(model.num_moe_layers, model.num_experts, model.top_k, model=model)
    start = time.perf_counter()
    builder.update(chunk)
    return tokens * model.num_moe_layers * model.top_k / (time.perf_counter() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="200000,1000000,5000000", help="comma-separated token counts")
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the traces written")
    parser.add_argument("--reuse", action="store_true",
                        help="with --dir: reuse a trace already there (DIR/tN/trace.npz) instead of synthesising it")
    parser.add_argument("--output", default=None, help="also write the markdown table here")
    parser.add_argument("--repeat", type=int, default=1, help="runs per command but synth (median wall, max peak)")
    parser.add_argument("--baseline", default=None, help="another placer tree run beside this one (PYTHONPATH)")
    args = parser.parse_args()
    counts = [int(x) for x in args.tokens.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        parser.error("--tokens takes positive token counts, comma-separated")
    placer = shutil.which("placer", path=os.path.dirname(sys.executable)) or shutil.which("placer")
    if placer is None:
        parser.error("the placer command is not on PATH (install the package)")
    model = get_model(MODEL)
    pairs_per_token = model.num_moe_layers * model.top_k
    rate = kernel_rate()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="trace-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    base_cols = (" before: wall s | peak MiB | M pairs/s |", "---|---|---|") if args.baseline else ("", "")
    lines = [f"DeepSeek-V3 ({model.num_moe_layers} MoE layers x {model.num_experts} experts, top-{model.top_k}); "
             f"{' '.join(CLUSTER)}; statistics kernel alone: {rate:.1f} M pairs/s; median of {args.repeat}", "",
             "| tokens | trace .npz | command | wall s | peak MiB | M pairs/s |" + base_cols[0],
             "|---|---|---|---|---|---|" + base_cols[1]]
    print("\n".join(lines), flush=True)
    try:
        for n in counts:
            workdir = root / f"t{n}"
            workdir.mkdir(exist_ok=True)
            for label, argv in commands(workdir):
                if label == "synth" and args.reuse and (workdir / "trace.npz").exists():
                    continue
                cmd = [placer, *(a.format(tokens=n) for a in argv)]
                trees = [None] if label == "synth" or not args.baseline else [None, args.baseline]
                runs: dict[str | None, list[tuple[float, float]]] = {tree: [] for tree in trees}
                for _ in range(1 if label == "synth" else max(1, args.repeat)):
                    for tree in trees:  # alternating: both trees see the same load
                        runs[tree].append(measure(cmd, tree))
                size = (workdir / "trace.npz").stat().st_size / 1e6
                row = f"| {n:,} | {size:,.0f} MB | `{label}` |"
                for tree in ([None, args.baseline] if args.baseline else [None]):
                    if tree not in runs:
                        row += " - | - | - |"
                        continue
                    wall = statistics.median(w for w, _ in runs[tree])
                    peak = max(p for _, p in runs[tree])
                    row += f" {wall:.1f} | {peak:,.0f} | {n * pairs_per_token / wall / 1e6:.1f} |"
                lines.append(row)
                print(row, flush=True)
            if not args.keep:
                shutil.rmtree(workdir)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
