"""Router-hook overhead and aggregation throughput of ``placer profile`` on the embedded model.

Forward passes of one batch of held-out prompts are timed without and with the
:class:`~placer.profiling.capture.RouterRecorder` (router hooks plus the per-forward conversion
to a sorted, padding-free RoutingTrace), alternating which goes first in each repetition, in
the same process; then the captured chunks are fed to a
:class:`~placer.stats.StatsBuilder` (counts, transitions, reservoir) and timed.
Medians are reported.

Usage:
    .venv/bin/python benchmarks/bench_profile.py [--reps 15] [--batch 8] [--length 512] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from placer.profiling import embedded
    from placer.profiling.capture import RouterRecorder, model_spec
    from placer.profiling.hf import _batch
    from placer.stats import StatsBuilder

    torch.set_num_threads(args.threads)
    model = embedded.load_embedded()
    spec = model_spec(model, embedded.NAME)
    tok = embedded.ByteTokenizer()
    prompts = embedded.heldout_prompts(max_bytes=args.length - 1, limit=args.batch)
    inp, mask = _batch(torch, [tok.encode(p)[:args.length] for p in prompts], tok.pad_token_id, left=False)
    tokens = int(mask.sum())
    chunks = []
    recorder = RouterRecorder(model, spec, chunks.append, pad_token_id=tok.pad_token_id)

    def forward() -> float:
        start = time.perf_counter()
        model(input_ids=inp, attention_mask=mask, use_cache=False)
        return time.perf_counter() - start

    plain, hooked = [], []
    with torch.inference_mode():
        forward()  # warm-up
        for rep in range(args.reps):
            for hooks in ((False, True) if rep % 2 == 0 else (True, False)):
                if hooks:
                    with recorder:
                        hooked.append(forward())
                else:
                    plain.append(forward())
    assert len(chunks) == args.reps and all(c.num_tokens == tokens for c in chunks)

    agg = []
    for _ in range(args.reps):
        builder = StatsBuilder(spec.num_moe_layers, spec.num_experts, spec.top_k, model=spec)
        start = time.perf_counter()
        for c in chunks:
            builder.update(c)
        agg.append(time.perf_counter() - start)
    t_plain, t_hooked, t_agg = (statistics.median(x) for x in (plain, hooked, agg))
    result = {
        "model": spec.name, "parameters": int(sum(p.numel() for p in model.parameters()) - model.lm_head.weight.numel()),
        "batch": args.batch, "tokens_per_forward": tokens, "reps": args.reps, "threads": args.threads,
        "forward_ms_plain": round(t_plain * 1e3, 2), "forward_ms_hooked": round(t_hooked * 1e3, 2),
        "overhead_pct": round((t_hooked / t_plain - 1) * 100, 2),
        "forward_tok_per_s_hooked": round(tokens / t_hooked),
        "aggregation_tok_per_s": round(tokens * len(chunks) / t_agg),
        "plain_ms_iqr": [round(float(np.percentile(plain, q)) * 1e3, 2) for q in (25, 75)],
        "hooked_ms_iqr": [round(float(np.percentile(hooked, q)) * 1e3, 2) for q in (25, 75)],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{spec.name}: batch {args.batch} x <= {args.length} tokens ({tokens} real tokens), {args.reps} reps, "
          f"{args.threads} thread(s)")
    print("| forward, no hooks (ms) | forward, hooks (ms) | overhead | hooked tok/s | aggregation tok/s |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {result['forward_ms_plain']} | {result['forward_ms_hooked']} | {result['overhead_pct']:+.2f}% | "
          f"{result['forward_tok_per_s_hooked']:,} | {result['aggregation_tok_per_s']:,} |")


if __name__ == "__main__":
    main()
