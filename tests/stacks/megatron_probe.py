"""Run RELEASED megatron-core's router (CPU only) on random logits and write a Megatron router
trace JSONL from it; print one JSON object.

Run with the stacks venv (never the main one)::

    .venv-stacks/bin/python tests/stacks/megatron_probe.py --out DIR/router_trace_rank0.jsonl \\
        --layers 4 --tokens 256 --experts 8 --topk 2 --steps 2 --seed 0 \\
        [--probs-out DIR/with_probs.jsonl] [--score-function softmax|sigmoid] [--pre-softmax]

Per step and MoE layer: logits ``torch.randn(tokens, experts)`` (seeded), then
``megatron.core.transformer.moe.moe_utils.topk_routing_with_score_function(logits, topk, ...)``,
the function ``TopKRouter.routing`` calls (the ``fused=False`` path; no Transformer Engine on
CPU). It returns ``routing_probs`` [tokens, experts] and the boolean ``routing_map``
[tokens, experts] that the token dispatcher and the router tracer consume.

The records: Megatron-LM's ``megatron/core/transformer/moe/router_trace.py`` is NOT in the
megatron-core 0.16.1 wheel (the newest release for Python 3.11), so its record layout is
transcribed here: one JSON line per (step, layer) ``{"step", "stage", "block", "layer", "rank",
"num_tokens", "topk", "top_indices"}`` with ``top_indices[t]`` the experts of token ``t`` from
``routing_map.nonzero()`` (row-major, so each token's ids come out ascending, not by gate
score); multi-token-prediction records add ``"mtp_idx"`` (one is written per step). With
``--probs-out`` a second file carries ``"top_probs"`` too: ``routing_probs`` at the same
(token, expert) positions, the key placer reads as gate probabilities.

Output: ``{"megatron_core": VERSION, "function": "...", "layers": L, "experts": E, "topk": K,
"tokens": steps * tokens, "load": [L][E] (routing_map column sums over steps),
"top1": [steps * tokens][L] (argmax of routing_probs: Megatron's top-1 expert),
"nonzero_ascending": bool, "seconds": S}``, or ``{"available": false, "error": "..."}`` when
megatron-core does not import. Exit status 0 in both cases, 1 on a harness bug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron_probe")
    ap.add_argument("--out", required=True)
    ap.add_argument("--probs-out", default=None)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score-function", default="softmax", choices=("softmax", "sigmoid"))
    ap.add_argument("--pre-softmax", action="store_true")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed" etc.
            import megatron.core
            import torch
            from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    except Exception as exc:  # noqa: BLE001 - reported to the test, which skips or fails
        sys.stdout.write(json.dumps({"available": False, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 0

    gen = torch.Generator().manual_seed(args.seed)
    load = torch.zeros(args.layers, args.experts, dtype=torch.int64)
    top1 = []
    ascending = True
    lines, prob_lines = [], []
    for step in range(args.steps):
        step_top1 = torch.empty(args.tokens, args.layers, dtype=torch.int64)
        for layer in range(args.layers):
            logits = torch.randn(args.tokens, args.experts, generator=gen)
            probs, routing_map = topk_routing_with_score_function(
                logits, args.topk, use_pre_softmax=args.pre_softmax, score_function=args.score_function)
            assert routing_map.dtype == torch.bool and routing_map.shape == logits.shape
            load[layer] += routing_map.sum(dim=0)
            step_top1[:, layer] = probs.argmax(dim=-1)
            # the tracer: routing_map.nonzero() -> (token, expert) pairs, row-major
            top_indices = [[] for _ in range(args.tokens)]
            top_probs = [[] for _ in range(args.tokens)]
            for t, e in routing_map.nonzero().tolist():
                top_indices[t].append(e)
                top_probs[t].append(float(probs[t, e]))
            ascending = ascending and all(row == sorted(row) for row in top_indices)
            rec = {"step": step, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
                   "num_tokens": args.tokens, "topk": args.topk, "top_indices": top_indices}
            lines.append(json.dumps(rec))
            prob_lines.append(json.dumps({**rec, "top_probs": top_probs}))
        mtp_logits = torch.randn(args.tokens, args.experts, generator=gen)
        _, mtp_map = topk_routing_with_score_function(mtp_logits, args.topk, score_function=args.score_function)
        mtp = [[] for _ in range(args.tokens)]
        for t, e in mtp_map.nonzero().tolist():
            mtp[t].append(e)
        mtp_rec = json.dumps({"step": step, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "mtp_idx": 0,
                              "rank": 0, "num_tokens": args.tokens, "topk": args.topk, "top_indices": mtp})
        lines.append(mtp_rec)
        prob_lines.append(mtp_rec)
        top1.append(step_top1)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    if args.probs_out:
        with open(args.probs_out, "w", encoding="utf-8") as f:
            f.write("\n".join(prob_lines) + "\n")
    out = {"megatron_core": megatron.core.__version__,
           "function": "megatron.core.transformer.moe.moe_utils.topk_routing_with_score_function",
           "layers": args.layers, "experts": args.experts, "topk": args.topk, "tokens": args.steps * args.tokens,
           "load": load.tolist(), "top1": torch.cat(top1).tolist(), "nonzero_ascending": ascending,
           "seconds": round(time.perf_counter() - start, 3)}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
