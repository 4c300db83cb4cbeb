"""Synthetic routing vs real traces, per model preset, side by side.

    python benchmarks/calibrate_synthetic.py [--data ../shared/data] [--scale 1.0]

For every preset it generates a synthetic trace (token counts shrink with model size; ``--scale``
multiplies them) and prints the figures of :func:`placer.synthetic.routing_figures`:

- ``max/mean``: per-layer expert load max/mean, mean over layers [min, max over layers];
- ``aff/marg``: held-out share of tokens whose next-layer top-1 is among the 2 most likely given
  the current top-1, vs among the 2 most loaded next-layer experts (hdmoe SOURCE.txt);
- ``pair/marg``: share of all K*K consecutive-layer selections on each expert's K most
  co-selected next experts, vs on the K most loaded (OLMoE SOURCE.txt "pair proxy");
- ``EP32``: GPU max/mean load of a contiguous 32-GPU placement (E divisible by 32);
- ``TV pert``: median [max] over layers of the total-variation distance between the load of the
  fitting stream (seed 0) and a scoring stream (seed 1, ``perturbed(profile,
  SCORING_PERTURBATION, 1)``); ``TV seed`` is the same with no perturbation (sampling noise).

Real rows read the files under ``shared/data`` when present (never copied into the repo):
hdmoe-mixtral-mtbench (Mixtral JSON traces), qwen3-30b-a3b-load (load CSVs),
expertaffinity-olmoe-sonnet (OLMoE pair counts). Presets without data print the literature
anchor their knobs were guessed from.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from placer.presets import MODELS
from placer.synthetic import (
    SCORING_PERTURBATION,
    perturbed,
    profile_for,
    routing_figures,
    synthesize_trace,
)

REPO = Path(__file__).resolve().parents[1]
TOKENS = {"mixtral-8x7b": 50_000, "mixtral-8x22b": 30_000, "deepseek-v2-lite": 30_000,
          "deepseek-v3": 15_000, "qwen3-30b-a3b": 30_000, "qwen3-235b-a22b": 15_000,
          "olmoe-1b-7b": 30_000, "gpt-oss-120b": 20_000, "llama-4-maverick": 40_000,
          "kimi-k2": 12_000}
NOTES = {
    "mixtral-8x22b": "no trace; knobs of mixtral-8x7b",
    "deepseek-v2-lite": "no trace; guess: max/mean ~3 (OLMoE c4 2.5-3.0)",
    "deepseek-v3": "no trace; TRT-LLM DeepSeek-R1 EP32 per-iteration GPU max/mean 2.56; "
                   "UltraEP rank max/mean 1.3-4.0",
    "qwen3-235b-a22b": "no trace; knobs of qwen3-30b-a3b (issue: max/mean 5-12)",
    "gpt-oss-120b": "no trace; guess: max/mean ~4",
    "llama-4-maverick": "no trace; guess: max/mean ~4, Mixtral affinity",
    "kimi-k2": "no trace; knobs of deepseek-v3",
}


# ---------------------------------------------------------------------------- real data


def load_mixtral(data: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((data / "hdmoe-mixtral-mtbench").glob("experts_*_mixtral.json")):
        d = json.loads(f.read_text())
        layers = sorted(d, key=int)
        out[f.stem.split("_")[1]] = np.stack([np.asarray(d[k], np.int16) for k in layers], axis=1)
    return out


def load_qwen_csv(data: Path) -> list[tuple[str, np.ndarray]]:
    """(file:language, fractions [48, 128]) per CSV row group."""
    import pandas as pd

    out = []
    for f in sorted((data / "qwen3-30b-a3b-load").glob("*.csv")):
        df = pd.read_csv(f)
        cols = [c for c in df.columns if c.startswith("Expert_")]
        for lang, g in df.groupby("Language"):
            g = g.sort_values("Layer")
            out.append((f"{f.stem.split('_')[4]}:{lang}", g[cols].to_numpy(np.float64)))
    return out


def load_olmoe(data: Path) -> tuple[np.ndarray, np.ndarray] | None:
    d = data / "expertaffinity-olmoe-sonnet"
    inter, intra = d / "OLMoE_Inter_Layer_Selection_sonnet_512.npy", d / "OLMoE_Intra_Layer_Affinity_sonnet_512.npy"
    if not inter.exists():
        return None
    return np.load(inter, allow_pickle=False), np.load(intra, allow_pickle=False)


# ---------------------------------------------------------------------------- figures


def layer_loads(ids: np.ndarray, e: int) -> np.ndarray:
    ids = ids.astype(np.int64)
    num_layers = ids.shape[1]
    off = (np.arange(num_layers) * e)[None, :, None]
    return np.bincount((ids + off).ravel(), minlength=num_layers * e).reshape(num_layers, e)


def skew_text(load: np.ndarray) -> str:
    r = load.max(axis=1) / load.mean(axis=1)
    return f"{r.mean():5.2f} [{r.min():.2f},{r.max():5.2f}]"


def tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    pa = a / a.sum(axis=1, keepdims=True)
    pb = b / b.sum(axis=1, keepdims=True)
    return 0.5 * np.abs(pa - pb).sum(axis=1)


def ep32(load: np.ndarray) -> str:
    if load.shape[1] % 32:
        return "   -"
    g = load.reshape(load.shape[0], 32, -1).sum(axis=2)
    return f"{(g.max(axis=1) / g.mean(axis=1)).mean():4.2f}"


def row(label: str, tokens: str, skew: str, aff: str, pair: str, gpu: str, tvs: str) -> str:
    return f"  {label:<22} {tokens:>7}  {skew:<19} {aff:<11} {pair:<11} {gpu:>4}  {tvs}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the token counts")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    data: Path = args.data
    have = data.is_dir()
    print(f"real data: {data if have else 'not found (synthetic rows only)'}")
    print(f"scoring perturbation: {SCORING_PERTURBATION}\n")
    print(row("source", "tokens", "max/mean [min,max]", "aff/marg", "pair/marg", "EP32",
              "TV pert [max] | TV seed"))
    mixtral = load_mixtral(data) if have else {}
    qwen = load_qwen_csv(data) if have else []
    olmoe = load_olmoe(data) if have else None

    for name in args.models:
        model = MODELS[name]
        n = max(2000, int(TOKENS.get(name, 20_000) * args.scale))
        prof = profile_for(model)
        t0 = time.perf_counter()
        trace = synthesize_trace(model, n, seed=0)
        dt = time.perf_counter() - t0
        e = model.num_experts
        f = routing_figures(trace.expert_ids, e)
        load = layer_loads(trace.expert_ids, e)
        other = synthesize_trace(model, n, seed=1, profile=perturbed(prof, SCORING_PERTURBATION, 1))
        noise = synthesize_trace(model, n, seed=1)
        d_pert = tv(load, layer_loads(other.expert_ids, e))
        d_seed = tv(load, layer_loads(noise.expert_ids, e))
        print(f"{name}  (L={model.num_moe_layers}, E={e}, K={model.top_k}; "
              f"generated at {n / dt / 1e3:.0f}k tokens/s wall, first call compiles)")
        print(row("synthetic", f"{n}", skew_text(load), f"{f['affinity']:.3f}/{f['marginal']:.3f}",
                  f"{f['pair_proxy']:.3f}/{f['pair_marginal']:.3f}", ep32(load),
                  f"{np.median(d_pert):.3f} [{d_pert.max():.3f}] | {np.median(d_seed):.3f}"))
        if name == "mixtral-8x7b" and mixtral:
            for cat, ids in mixtral.items():
                g = routing_figures(ids, 8)
                lo = layer_loads(ids, 8)
                print(row(f"real {cat}", f"{len(ids)}", skew_text(lo),
                          f"{g['affinity']:.3f}/{g['marginal']:.3f}",
                          f"{g['pair_proxy']:.3f}/{g['pair_marginal']:.3f}", "-", ""))
            cats = list(mixtral.values())
            loads = [layer_loads(c, 8) for c in cats]
            worst = np.max([tv(a, b) for i, a in enumerate(loads) for b in loads[i + 1:]], axis=0)
            print(row("real between categories", "", "", "", "", "",
                      f"{np.median(worst):.3f} [{worst.max():.3f}] (largest pair per layer)"))
        elif name == "qwen3-30b-a3b" and qwen:
            means = []
            for label, frac in qwen:
                r = frac.max(axis=1) / frac.mean(axis=1)
                means.append(r.mean())
                print(row(f"real {label}", "", f"{r.mean():5.2f} [{r.min():.2f},{r.max():5.2f}]",
                          "-", "-", ep32(frac), ""))
            print(row("real range of means", "", f"{min(means):.2f}-{max(means):.2f}", "", "", "", ""))
        elif name == "olmoe-1b-7b" and olmoe is not None:
            inter, intra = olmoe
            lo = np.concatenate([inter.sum(axis=2), inter[-1].sum(axis=0)[None]]) / 8
            k = 8
            hits = np.sort(inter, axis=2)[:, :, -k:].sum()
            base = (np.sort(inter.sum(axis=1), axis=1)[:, -k:].sum())
            total = inter.sum()
            print(row("real sonnet (decode)", f"{int(round(inter[0].sum() / 64))}", skew_text(lo), "-",
                      f"{hits / total:.3f}/{base / total:.3f}", "-", ""))
        elif name in NOTES:
            print(f"  ({NOTES[name]})")
        print()


if __name__ == "__main__":
    main()
