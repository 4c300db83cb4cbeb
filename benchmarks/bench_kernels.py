"""Bandwidth of the permute/unpermute ops against a plain copy of the same bytes, same run.

Bytes moved are the minimum the op must move: permute reads each token once and writes K rows,
unpermute reads K rows and writes one token, so both move (1 + K) * T * H * itemsize bytes. The
copy moves 2 * T * K * H * itemsize (it reads and writes the permuted rows' buffer). Each figure
is a median over --repeats runs (the machine is noisy); ratios are GB/s over the copy's GB/s.

    python benchmarks/bench_kernels.py                 # CPU, torch backend
    python benchmarks/bench_kernels.py --device cuda   # GPU, triton and torch backends

Columns: ``data`` times only the data movement (the row map precomputed); ``op`` is the full
checked call (routing, stable sort, range checks, data movement). Outputs go to preallocated
buffers (``out=``), as for the copy: a fresh allocation would add page faults to every call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from placer.kernels import permute, unpermute
from placer.kernels.ops import route, row_map_of

# (tokens, hidden, top_k, experts, slots)
CPU_SHAPES = ((4096, 2048, 8, 64, 72), (8192, 4096, 2, 8, 12))
GPU_SHAPES = ((4096, 7168, 8, 256, 288), (16384, 4096, 2, 8, 12), (8192, 2048, 8, 128, 144))


def _timer(device: str, inner: int):
    def run(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / inner
    return run


def _median(fn, timer, repeats: int) -> float:
    fn()  # warm-up (and Triton compile)
    return statistics.median(timer(fn) for _ in range(repeats))


def bench_shape(shape, *, device: str, backend: str, dtype: torch.dtype, repeats: int) -> dict:
    tokens, hidden, top_k, experts, slots = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    ids = torch.argsort(torch.rand(tokens, experts, generator=gen), dim=1)[:, :top_k]
    ids = ids.to(device=device, dtype=torch.int32)
    smap = torch.from_numpy(np.random.default_rng(0).permutation(slots)[:experts]).to(device)
    weights = torch.rand(tokens, top_k, generator=gen).to(device)
    timer = _timer(device, inner=5 if device == "cuda" else 1)
    row_map, order, _ = row_map_of(route(ids, smap), slots)
    src = torch.empty(tokens * top_k, hidden, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    item = x.element_size()
    moved = (1 + top_k) * tokens * hidden * item
    t_copy = _median(lambda: dst.copy_(src), timer, repeats)
    if backend == "triton":
        from placer.kernels._triton import permute_rows, unpermute_rows

        def data_permute():
            return permute_rows(x, row_map, dst)
    elif device == "cpu" and (hidden * item) % 4 == 0:
        from placer.kernels._cpu import gather_rows
        words = hidden * item // 4
        x32 = x.view(torch.uint8).numpy().view(np.uint32).reshape(tokens, words)
        dst32 = dst.view(torch.uint8).numpy().view(np.uint32).reshape(tokens * top_k, words)
        source = (order // top_k).numpy()

        def data_permute():  # the row gather the op runs on CPU, without the routing and sort
            return gather_rows(x32, source, dst32)
    else:
        def data_permute():
            return torch.index_select(x, 0, order // top_k, out=dst)
    rows = permute(x, ids, smap, slots, backend=backend).rows
    combined = torch.empty_like(x)
    t = {
        "copy": t_copy,
        "permute data": _median(data_permute, timer, repeats),
        "permute op": _median(lambda: permute(x, ids, smap, slots, backend=backend, out=dst),
                              timer, repeats),
        "unpermute op": _median(lambda: unpermute(rows, row_map, weights, backend=backend,
                                                  out=combined), timer, repeats),
    }
    if backend == "triton":
        w32 = weights.float()
        t["unpermute data"] = _median(lambda: unpermute_rows(rows, row_map, w32, combined), timer,
                                      repeats)
    copy_gbps = 2 * src.numel() * item / t_copy / 1e9
    gbps = {name: (2 * src.numel() * item if name == "copy" else moved) / sec / 1e9
            for name, sec in t.items()}
    return {"shape": shape, "ms": {k: v * 1e3 for k, v in t.items()}, "gbps": gbps,
            "ratio": {k: v / copy_gbps for k, v in gbps.items()},
            "time_ratio": {k: t_copy / v for k, v in t.items()}}


def report(results: list[dict], *, device: str, backend: str, dtype: torch.dtype,
           hbm_gbps: float | None) -> None:
    print(f"device={device} backend={backend} dtype={str(dtype).removeprefix('torch.')} "
          f"torch threads={torch.get_num_threads()}")
    head = f"{'T,H,K,E,P':>24}  {'what':<15}{'ms':>9}{'GB/s':>9}{'vs copy':>9}{'copy t/t':>10}"
    if hbm_gbps:
        head += f"{'vs HBM':>9}"
    print(head)
    for r in results:
        for name, ms in r["ms"].items():
            line = (f"{','.join(map(str, r['shape'])):>24}  {name:<15}{ms:9.3f}"
                    f"{r['gbps'][name]:9.1f}{r['ratio'][name]:9.2f}{r['time_ratio'][name]:10.2f}")
            if hbm_gbps:
                line += f"{r['gbps'][name] / hbm_gbps:9.2f}"
            print(line)
    print("GB/s counts (1+K)*T*H*itemsize for the ops (the fewest bytes they can move) and "
          "2*T*K*H*itemsize for the copy; 'vs copy' is the ratio of those rates; 'copy t/t' is the "
          "time of a plain copy of the permuted buffer (T*K rows: what permute writes and unpermute "
          "reads) over the op's time; medians of the repeats")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--hbm-gbps", type=float, default=None,
                        help="nominal HBM bandwidth for a 'vs HBM' column (H200: 4800)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = args.backend
    if backend == "auto":
        backend = "triton" if args.device == "cuda" else "torch"
    dtype = getattr(torch, args.dtype)
    shapes = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    results = [bench_shape(s, device=args.device, backend=backend, dtype=dtype,
                           repeats=args.repeats) for s in shapes]
    report(results, device=args.device, backend=backend, dtype=dtype, hbm_gbps=args.hbm_gbps)
    return results


if __name__ == "__main__":
    main()
