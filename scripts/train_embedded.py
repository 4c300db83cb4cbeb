"""Train the embedded default model of ``placer profile`` on CPU, measure its routing, and ship it.

The model is a small transformers ``MixtralForCausalLM`` (the architecture is
``placer.profiling.embedded.ARCHITECTURE``: 4 layers, 8 experts, top-2, hidden 128, byte-level
vocabulary) trained as a byte-level language model on a pinned list of Python standard-library
source files (``embedded.TRAIN_FILES``, with the sha256 each had on CPython 3.11.7). Files
missing here or with another hash are reported; training uses what it finds. The router
auxiliary load-balancing loss (``router_aux_loss_coef``) keeps the experts from collapsing.

After training, the float16-rounded weights are profiled through placer's own router hooks on
held-out standard-library files (``embedded.HELDOUT_FILES``, never trained on), and the model is
accepted only when every layer's expert load max/mean lies in [1.1, 3] and the mean next-layer
top-1 affinity exceeds the marginal baseline by at least 0.10 (both as
``placer.synthetic.routing_figures`` defines them: the successor table fitted on a random half of
the tokens, scored on the other half). Only an accepted model is written (``config.json``,
``model.safetensors``, ``training.json``) unless ``--force``.

Deterministic for a given seed and set of files (one torch thread). Never run by ``make test``.

Usage:
    .venv/bin/python scripts/train_embedded.py                 # ~7 minutes on one CPU core
    .venv/bin/python scripts/train_embedded.py --steps 50 --out /tmp/emb --force   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from placer.io.atomic import atomic_write_bytes, atomic_write_text
from placer.profiling import embedded
from placer.profiling.capture import model_spec
from placer.profiling.hf import LoadedModel, capture_chunks
from placer.profiling.summary import summarize
from placer.stats import StatsBuilder
from placer.synthetic import routing_figures

SKEW_RANGE = (1.1, 3.0)
MIN_AFFINITY_MARGIN = 0.10


def corpus(files: list[tuple[str, bytes]]) -> np.ndarray:
    """Every file as ``[BOS] + bytes + [EOS]``, concatenated: int64 [N]."""
    parts = [np.concatenate([[embedded.BOS], np.frombuffer(data, np.uint8), [embedded.EOS]]) for _, data in files]
    return np.concatenate(parts).astype(np.int64)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace, data: np.ndarray):
    import torch
    from transformers import MixtralForCausalLM

    config = embedded.architecture_config()
    config.output_router_logits = True  # adds router_aux_loss_coef * load-balancing loss to the loss
    torch.manual_seed(args.seed)
    model = MixtralForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.from_numpy(data)
    start = time.perf_counter()
    log = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, len(tokens) - args.seq, (args.batch,), generator=gen)
        batch = torch.stack([tokens[s:s + args.seq] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            entry = {"step": step, "loss": round(out.loss.item(), 4), "aux_loss": round(out.aux_loss.item(), 4),
                     "seconds": round(time.perf_counter() - start, 1)}
            log.append(entry)
            print(f"step {step:5d}  loss {entry['loss']:.4f}  aux {entry['aux_loss']:.4f}  "
                  f"{entry['seconds']:.0f} s", flush=True)
    model.config.output_router_logits = False
    model.eval()
    # Measure what ships: round the weights to float16.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model, log, time.perf_counter() - start


def heldout_bits_per_byte(model, prompts: list[str], context: int) -> float:
    """Mean held-out cross-entropy in bits per byte (next-byte prediction)."""
    import torch

    tok = embedded.ByteTokenizer()
    total, count = 0.0, 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tok.encode(p)[:context]])
            if ids.shape[1] < 2:
                continue
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            total += float(out.loss) * n
            count += n
    return total / max(count, 1) / math.log(2)


def measure(model, context: int) -> dict:
    """Routing figures of the model on the held-out files (placer's own capture path), in windows
    no longer than the trained context (RoPE positions beyond it were never trained)."""
    spec = model_spec(model, embedded.NAME)
    loaded = LoadedModel(model, embedded.ByteTokenizer(), spec, "embedded")
    prompts = embedded.heldout_prompts(max_bytes=context - 1)
    builder = StatsBuilder(spec.num_moe_layers, spec.num_experts, spec.top_k, model=spec)
    parts = []
    for chunk in capture_chunks(loaded, prompts, batch_size=16, max_length=context):
        builder.update(chunk)
        parts.append(chunk.expert_ids)
    summary = summarize(builder.result("all"))
    figures = routing_figures(np.concatenate(parts), spec.num_experts)
    skew = summary["per_layer"]["max_over_mean"]
    accepted = (all(SKEW_RANGE[0] <= s <= SKEW_RANGE[1] for s in skew)
                and figures["affinity"] >= figures["marginal"] + MIN_AFFINITY_MARGIN)
    return {"heldout_prompts": len(prompts), "tokens": summary["tokens"],
            "load_max_over_mean_per_layer": [round(s, 4) for s in skew],
            "affinity_in_sample_per_transition": summary["per_transition"]["affinity"],
            "marginal_in_sample_per_transition": summary["per_transition"]["marginal"],
            "routing_figures": {k: round(v, 4) for k, v in figures.items()},
            "heldout_bits_per_byte": round(heldout_bits_per_byte(model, prompts[:64], context), 4),
            "accepted": bool(accepted),
            "criteria": f"every layer max/mean in [{SKEW_RANGE[0]}, {SKEW_RANGE[1]}]; affinity >= marginal + "
                        f"{MIN_AFFINITY_MARGIN} (routing_figures, held-out half)"}


def save(model, out: Path, record: dict) -> None:
    from safetensors.torch import save as to_bytes

    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    keep = set(embedded.ARCHITECTURE) | {"model_type", "architectures", "hidden_act", "rms_norm_eps",
                                         "initializer_range", "attention_dropout", "head_dim"}
    config = {k: v for k, v in config.items() if k in keep}
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    atomic_write_bytes(out / "model.safetensors", to_bytes(state, metadata={"format": "pt", "name": embedded.NAME}))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    record["weights_bytes"] = (out / "model.safetensors").stat().st_size
    atomic_write_text(out / "training.json", json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps a shared machine usable)")
    ap.add_argument("--out", type=Path, default=embedded.HERE)
    ap.add_argument("--force", action="store_true", help="write the model even when it is not accepted")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    files, notes = embedded.find_files(embedded.TRAIN_FILES)
    for note in notes:
        print(f"note: {note}; training on what is found", file=sys.stderr)
    if not files:
        print("error: none of the pinned standard-library files is present", file=sys.stderr)
        return 2
    data = corpus(files)
    print(f"training on {len(files)} files, {len(data):,} bytes; {args.steps} steps of {args.batch} x "
          f"{args.seq} tokens", flush=True)
    model, log, seconds = train(args, data)
    figures = measure(model, args.seq)
    params = sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")
    record = {"name": embedded.NAME, "python": platform.python_version(), "torch": torch.__version__,
              "files": [rel for rel, _ in files], "hash_notes": notes, "corpus_bytes": int(len(data)),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "parameters": int(params), "train_seconds": round(seconds, 1), "log": log, "figures": figures}
    print(json.dumps(figures, indent=2))
    if not figures["accepted"] and not args.force:
        print("not accepted: the model was not written (--force writes it anyway)", file=sys.stderr)
        return 1
    save(model, args.out, record)
    print(f"wrote {args.out}/model.safetensors ({record['weights_bytes']:,} bytes, {params:,} parameters), "
          f"config.json, training.json; trained in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
