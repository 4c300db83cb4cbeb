"""Streaming statistics throughput: placer's StatsBuilder (numba kernel) vs plain numpy.

    python benchmarks/bench_stats.py [--tokens 1000000] [--numpy-tokens 131072] [--repeats 3]

Generates a DeepSeek-V3-shaped synthetic trace (58 MoE layers, E=256, top-8) in chunks (not
timed), then times ``StatsBuilder.update`` over the chunks counting every matrix: load [L, E],
top-1 transitions and all-pairs transitions [L-1, E, E], co-activation [L, E, E], plus the
reservoir sample. (a) is the builder as shipped (numba kernel), (a') the kernel alone (the
difference is the builder's overhead: reservoir, phase handling), (b) the same builder with the
plain-numpy kernel ``accumulate_numpy`` swapped in (on ``--numpy-tokens`` tokens: it is slow
and needs ~2 GiB of temporaries per 65536-token chunk). Records are token x layer x k; the
median of ``--repeats`` runs is reported. Numba's compile time is excluded from throughput but
printed (measured in a subprocess with an empty cache). Peak memory is what tracemalloc sees
the builder allocate beyond the held input chunks (numba's own NRT allocations, the 2 x E x E
int32 scratch of the kernel, are not traced).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from placer.presets import MODELS
from placer.stats import StatsBuilder, _count
from placer.synthetic import synthesize
from placer.types import RoutingStats, RoutingTrace

MiB = 1 << 20
_COMPILE_PROBE = """
import time
t0 = time.perf_counter()
import numpy as np
from placer.stats import _count
t1 = time.perf_counter()
L, E, K = 3, 8, 2
ids = np.zeros((4096, L, K), np.int16); ids[..., 1] = 1
args = (np.zeros((L, E), np.int64), np.zeros((L - 1, E, E), np.int64),
        np.zeros((L - 1, E, E), np.int64), np.zeros((L, E, E), np.int64))
_count.accumulate(ids[:2], *args)   # direct kernel
_count.accumulate(ids, *args)       # scratch kernel
print(time.perf_counter() - t1)
"""


def compile_seconds() -> str:
    if not _count.HAVE_NUMBA:
        return "numba not importable: numpy fallback"
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp)
        out = subprocess.run([sys.executable, "-c", _COMPILE_PROBE], env=env, capture_output=True,
                             text=True, check=True)
    return f"{float(out.stdout.strip()):.2f} s (fresh cache, int16 ids; later runs load it from disk)"


def run_builder(chunks: list[RoutingTrace], shape: tuple[int, int, int], sample_size: int,
                kernel: Callable | None = None) -> tuple[tuple[float, float], RoutingStats]:
    """(wall, CPU) seconds spent in ``update`` over all chunks, and the result."""
    saved = _count.accumulate
    if kernel is not None:
        _count.accumulate = kernel
    try:
        b = StatsBuilder(*shape, sample_size=sample_size)
        wall = cpu = 0.0
        for c in chunks:
            t0, c0 = time.perf_counter(), time.process_time()
            b.update(c)
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
        return (wall, cpu), b.result()
    finally:
        _count.accumulate = saved


def run_kernel(chunks: list[RoutingTrace], shape: tuple[int, int, int]) -> tuple[float, float]:
    num_layers, e, _ = shape
    arrays = (np.zeros((num_layers, e), np.int64), np.zeros((num_layers - 1, e, e), np.int64),
              np.zeros((num_layers - 1, e, e), np.int64), np.zeros((num_layers, e, e), np.int64))
    t0, c0 = time.perf_counter(), time.process_time()
    for c in chunks:
        _count.accumulate(c.expert_ids, *arrays)
    return time.perf_counter() - t0, time.process_time() - c0


def _no_op(*_args: object) -> None:
    """Stands in for the kernel to time the builder's own work (reservoir, phases, checks)."""


def peak_mib(chunks: list[RoutingTrace], shape: tuple[int, int, int], sample_size: int,
             kernel: Callable | None = None) -> tuple[float, float]:
    """Peak MiB traced during the updates, and during ``result()``."""
    saved = _count.accumulate
    if kernel is not None:
        _count.accumulate = kernel
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        b = StatsBuilder(*shape, sample_size=sample_size)
        for c in chunks:
            b.update(c)
        updates = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.reset_peak()
        b.result()
        result = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        _count.accumulate = saved
    return updates / MiB, result / MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--numpy-tokens", type=int, default=131_072,
                    help="tokens for the numpy kernel (0: all of --tokens)")
    ap.add_argument("--memory-tokens", type=int, default=250_000,
                    help="second, smaller stream for the memory comparison")
    ap.add_argument("--chunk", type=int, default=65_536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sample-size", type=int, default=16_384)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model = MODELS["deepseek-v3"]
    shape = (model.num_moe_layers, model.num_experts, model.top_k)
    num_layers, e, k = shape
    print(f"model {model.name}: L={num_layers} MoE layers, E={e}, K={k}; chunks of {args.chunk} tokens; "
          f"sample {args.sample_size} tokens; median of {args.repeats} runs")
    print(f"counted: load [{num_layers},{e}], top-1 transitions [{num_layers - 1},{e},{e}], "
          f"pair transitions [{num_layers - 1},{e},{e}] (K*K={k * k} per token-layer pair), "
          f"co-activation [{num_layers},{e},{e}] (K(K-1)/2={k * (k - 1) // 2} pairs per token-layer), "
          f"reservoir sample")

    t0, c0 = time.perf_counter(), time.process_time()
    chunks = [RoutingTrace(c.expert_ids, e, "sorted", model=model)  # ids only: drop gate weights
              for c in synthesize(model, args.tokens, seed=args.seed, chunk_tokens=args.chunk)]
    gen, gen_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"trace generation (not timed below): {args.tokens} tokens in {gen:.1f} s wall, "
          f"{gen_cpu:.1f} s CPU ({args.tokens / gen_cpu / 1e3:.0f}k tokens per CPU-second), ids held: "
          f"{sum(c.expert_ids.nbytes for c in chunks) / MiB:.0f} MiB")

    def take(n: int) -> list[RoutingTrace]:
        out, got = [], 0
        for c in chunks:
            if got >= n:
                break
            out.append(c if got + c.num_tokens <= n else c.select_tokens(np.arange(n - got)))
            got += out[-1].num_tokens
        return out

    print(f"numba compile: {compile_seconds()}")
    t0 = time.perf_counter()
    run_builder([chunks[0].select_tokens(np.arange(min(2048, chunks[0].num_tokens)))], shape, 16)
    print(f"first call in this process (cache load + warm-up): {time.perf_counter() - t0:.2f} s\n")

    n_np = args.numpy_tokens or args.tokens
    np_chunks = take(n_np)
    def median(times: list[tuple[float, float]]) -> tuple[float, float, float]:
        return (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times),
                min(t[1] for t in times))

    rows = []
    times = [run_builder(chunks, shape, args.sample_size)[0] for _ in range(args.repeats)]
    rows.append(("(a) StatsBuilder, numba", args.tokens, *median(times)))
    times = [run_kernel(chunks, shape) for _ in range(args.repeats)]
    rows.append(("(a') numba kernel alone", args.tokens, *median(times)))
    times = [run_builder(chunks, shape, args.sample_size, _no_op)[0] for _ in range(args.repeats)]
    overhead = median(times)
    times = []
    for _ in range(args.repeats):
        spent, np_result = run_builder(np_chunks, shape, args.sample_size, _count.accumulate_numpy)
        times.append(spent)
    rows.append(("(b) StatsBuilder, numpy", n_np, *median(times)))
    _, nb_result = run_builder(np_chunks, shape, args.sample_size)
    same = all(np.array_equal(getattr(nb_result, f), getattr(np_result, f))
               for f in ("load", "top1_transitions", "pair_transitions", "coactivation", "sample_ids"))

    counts = (2 * (num_layers - 1) + num_layers) * e * e * 8 / MiB
    print(f"peak memory (tracemalloc, builder allocations beyond the held input; the count "
          f"matrices alone are {counts:.0f} MiB):")
    mem = {}
    for kind, sizes, kern in (("numba", {min(args.memory_tokens, args.tokens), args.tokens}, None),
                              ("numpy", {min(args.chunk, n_np), n_np}, _count.accumulate_numpy)):
        for n in sorted(sizes):
            upd, res = peak_mib(take(n), shape, args.sample_size, kern)
            mem[(kind, n)] = upd
            print(f"  {kind} builder, {n:>9} tokens: updates {upd:8.1f} MiB, result() {res:8.1f} MiB")
    print(f"  process max RSS so far: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(includes the held input)\n")

    rec_per_token = num_layers * k
    base = rows[2][1] * rec_per_token / rows[2][3]
    print("records = tokens x layers x K. Throughput per CPU-second of this single-threaded process "
          "(median of the runs; 'best' = fastest run): other jobs on the machine inflate wall time "
          "and, through shared caches, CPU time too")
    print(f"{'method':<26} {'tokens':>9} {'records':>11} {'wall s':>7} {'CPU s':>7} {'best':>6} "
          f"{'Mrec/s':>7} {'best':>6} {'x numpy':>8} {'peak MiB':>9}")
    for label, n, wall, cpu, best in rows:
        rate = n * rec_per_token / cpu
        kind = "numpy" if "numpy" in label else "numba"
        peak = mem.get((kind, n)) if "alone" not in label else None
        peak_s = f"{peak:9.1f}" if peak is not None else f"{'-':>9}"
        print(f"{label:<26} {n:>9} {n * rec_per_token:>11} {wall:>7.2f} {cpu:>7.2f} {best:>6.2f} "
              f"{rate / 1e6:>7.1f} {n * rec_per_token / best / 1e6:>6.1f} {rate / base:>8.1f} {peak_s}")
    print(f"\nbuilder's own work (reservoir, phases; kernel replaced by a no-op): {overhead[1]:.2f} s CPU "
          f"for {args.tokens} tokens = {100 * overhead[1] / rows[1][3]:.1f} % of the kernel's CPU time")
    print(f"numba and numpy counts and samples identical on {n_np} tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
