"""One short GPU check of placer.kernels: the ``gpu`` tests, then the CUDA benchmark.

Run on a machine with a CUDA GPU, torch with CUDA and triton installed, from the repo root:

    python benchmarks/gpu_kernels_check.py

Prints the pytest summary and the bandwidth table (GB/s and ratios against a device copy of
the same bytes and against nominal H200 HBM, 4.8 TB/s). Budget: under 3 minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H200_HBM_GBPS = 4800.0


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_kernels_check: no CUDA device; nothing to check")
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "tests/kernels", "-m", "gpu", "-q",
                            "-p", "no:cacheprovider", "--timeout", "120"],
                           cwd=ROOT, env=env, timeout=150, check=False)
    print(f"gpu tests: exit {tests.returncode}, {time.perf_counter() - start:.1f} s")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_kernels

    for backend in ("triton", "torch"):
        bench_kernels.main(["--device", "cuda", "--backend", backend, "--repeats", "5",
                            "--hbm-gbps", str(H200_HBM_GBPS)])
    print(f"total {time.perf_counter() - start:.1f} s")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
