"""Wall time of ``placer solve --time-limit T`` and ``placer demo`` from process start, on an empty
numba cache (a fresh install) and on a warmed one (``python -m placer._warm``, what
``make install`` runs), on an idle machine and with two busy processes.

    python benchmarks/cold_start.py [--limits 5 10] [--repeats 1] [--no-demo] [--no-busy]

Input (made once, not timed): ``placer synth --model deepseek-v3 --tokens 20000``. Each solve is
``placer solve X --gpus 16 --nodes 2 --redundant 32 --method placer --time-limit T --json``;
the demo is ``placer demo -o DIR`` (what ``make demo`` runs). "cold" runs get a fresh empty
``NUMBA_CACHE_DIR``; a cold solve whose deadline came during compilation leaves the compilation
running in the background (it fills that cache for the next run): the script waits for it before
the next case, so it does not load the next measurement. "busy" starts two
``python3 -c "while True: pass"``-style processes (each bounded to --busy-max-s seconds) and
kills them by pid after the case. The goal is wall <= T + 2 s for a solve; printed per row:
wall from process start, the solve's status and seconds, whether it compiled, and the load
average when the case began (other users of the machine show there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACER = [sys.executable, "-m", "placer"]
BUSY = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass"


def _busy(n: int, max_s: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY.format(s=max_s)]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, 9)
        p.wait()


def _background_warmers(cache: str) -> list[int]:
    """Pids of ``python -m placer._warm`` processes compiling into ``cache`` (left by a cold solve)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"placer._warm" in (d / "cmdline").read_bytes() and \
                    f"NUMBA_CACHE_DIR={cache}".encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _wait_warmers(cache: str, limit_s: float = 300.0) -> float:
    t0 = time.monotonic()
    while _background_warmers(cache) and time.monotonic() - t0 < limit_s:
        time.sleep(0.2)
    return time.monotonic() - t0


def _run(cmd: list[str], cache: str, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    t0 = time.monotonic()  # the wall from just before the interpreter starts
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return time.monotonic() - t0, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limits", type=float, nargs="+", default=[5.0, 10.0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--no-busy", action="store_true")
    ap.add_argument("--busy-max-s", type=float, default=600.0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="placer-cold-"))
    rows: list[dict] = []
    try:
        trace = work / "x.npz"
        subprocess.run([*PLACER, "synth", "--model", "deepseek-v3", "--tokens", str(args.tokens), "-o", str(trace)],
                       check=True, capture_output=True, cwd=ROOT)
        warm = str(work / "warm-cache")
        os.makedirs(warm)
        t_warm, done = _run([sys.executable, "-m", "placer._warm"], warm, 900)
        print(f"python -m placer._warm (the install step) on an empty cache: {t_warm:.1f} s, rc {done.returncode}")

        solves = [(f"solve --time-limit {t:g}", t,
                   [*PLACER, "solve", str(trace), "--gpus", "16", "--nodes", "2", "--redundant", "32",
                    "--method", "placer", "--time-limit", f"{t:g}", "--json", "-o", str(work / "p.json")])
                  for t in args.limits]
        demo = [("demo", None, [*PLACER, "demo", "-o", str(work / "demo-out")])] if not args.no_demo else []
        loads = ["idle"] + ([] if args.no_busy else ["2 busy"])
        for load in loads:
            for cache_kind in ("cold", "warm"):
                for name, limit, cmd in solves + demo:
                    for _ in range(args.repeats):
                        cache = warm if cache_kind == "warm" else tempfile.mkdtemp(prefix="cache-", dir=work)
                        la = os.getloadavg()[0]
                        busy = _busy(2, args.busy_max_s) if load != "idle" else []
                        try:
                            wall, done = _run(cmd, cache, 900)
                        finally:
                            _stop(busy)
                        status, solve_s = "?", None
                        if name == "demo":
                            line = next((s for s in done.stdout.splitlines() if s.lstrip().startswith("placer ")), "")
                            status = (line.split()[1] if len(line.split()) > 1 else "?")
                            solve_s = float(line.split()[2]) if len(line.split()) > 2 else None
                        elif done.returncode == 0:
                            doc = json.loads(done.stdout)
                            status, solve_s = doc["status"], doc["solve_seconds"]
                        bg = _wait_warmers(cache) if cache_kind == "cold" else 0.0
                        row = {"command": name, "limit": limit, "cache": cache_kind, "load": load, "wall": wall,
                               "rc": done.returncode, "status": status, "solve_s": solve_s,
                               "compiled": "compiling the search kernels" in done.stderr, "bg_s": bg, "loadavg": la}
                        rows.append(row)
                        ok = "" if limit is None else ("ok" if wall <= limit + 2 else "OVER")
                        print(f"  {name:24} {cache_kind:4} {load:6} wall {wall:6.1f} s {ok:4} rc {done.returncode} "
                              f"status {status} solve {solve_s} compiled {row['compiled']} "
                              f"background compile {bg:.1f} s loadavg {la:.1f}", flush=True)
                        if done.returncode not in (0,):
                            print("    stderr:", done.stderr.strip().splitlines()[-1:] if done.stderr else "")
                        if cache_kind == "cold":
                            shutil.rmtree(cache, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'command':26} {'limit':>5} {'cache':5} {'load':6} {'wall (median)':>13} {'T+2':>5} {'status':8} "
          f"{'solve s':>7} {'compiled':8}")
    keys = []
    for r in rows:
        k = (r["command"], r["limit"], r["cache"], r["load"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        group = [r for r in rows if (r["command"], r["limit"], r["cache"], r["load"]) == k]
        wall = statistics.median(r["wall"] for r in group)
        solve = [r["solve_s"] for r in group if r["solve_s"] is not None]
        ok = "-" if k[1] is None else ("ok" if wall <= k[1] + 2 else "over")
        print(f"{k[0]:26} {('-' if k[1] is None else f'{k[1]:g}'):>5} {k[2]:5} {k[3]:6} {wall:13.1f} {ok:>5} "
              f"{'/'.join(sorted({r['status'] for r in group})):8} "
              f"{(f'{statistics.median(solve):.1f}' if solve else '-'):>7} "
              f"{'yes' if any(r['compiled'] for r in group) else 'no':8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
