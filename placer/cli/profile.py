"""The ``placer profile`` command (registered in :mod:`placer.cli`)."""

from __future__ import annotations

import sys

import click

from placer.cli.options import CONTEXT, FiniteFloat
from placer.errors import InvalidInputError
from placer.presets import MODELS
from placer.profiling.summary import summarize


def _summary_line(outcome) -> str:
    s = summarize(outcome.stats["all"])
    m = outcome.model
    line = (f"{m.name}: {outcome.tokens:,} tokens, {m.num_moe_layers} MoE layers, E={m.num_experts}, "
            f"top_k={m.top_k}; load max/mean median {s['median']['max_over_mean']:.3f}")
    if "mean" in s:
        line += (f"; next-layer top-1 in top-2 successors {s['mean']['affinity']:.3f} vs "
                 f"{s['mean']['marginal']:.3f} marginal")
    phases = [p for p in outcome.stats if p != "all"]
    if phases:
        line += "; phases " + ", ".join(f"{p} {outcome.stats[p].num_tokens:,}" for p in phases)
    return line


@click.command(context_settings=CONTEXT)
@click.option("--hf-model", "hf_model", default=None, metavar="PATH|FAMILY",
              help="Model to run: a local transformers directory, or a family built tiny with random weights "
                   "(mixtral, qwen3-moe, olmoe, deepseek-v3, gpt-oss, granite-moe); default: the embedded "
                   "trained model. With --sglang or --vllm-r3: a directory or family giving the shape.")
@click.option("--model", "model", default=None, metavar="PRESET",
              help="With --sglang, --vllm-r3 or --sglang-r3: the model preset giving the shape (as in every "
                   "command; a checkpoint or family to run is --hf-model).")
@click.option("--prompts", type=click.Path(), default=None,
              help="Prompts: .jsonl ({\"prompt\": ...} or strings per line) or text (one per line). "
                   "Default: held-out standard-library source.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Prompts per forward.")
@click.option("--max-length", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens kept per prompt (the embedded model was trained on 256).")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Generate this many tokens per prompt (greedy), recording decode routing too.")
@click.option("--max-prompts", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--sglang", "sglang_url", default=None, metavar="URL",
              help="Record a live SGLang server (http://HOST:PORT) instead of running a model.")
@click.option("--duration", type=FiniteFloat(min=0), default=60.0, show_default=True,
              help="Seconds to record with --sglang.")
@click.option("--dump-dir", type=click.Path(), default=None,
              help="The server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR (needed with --sglang).")
@click.option("--vllm-r3", "r3", type=click.Path(), default=None, metavar="FILE",
              help="Import vLLM 0.34.0's saved R3 routed experts (.jsonl, .npy, .txt/.b64; logical ids, "
                   "base64 of .npy bytes) instead of running a model.")
@click.option("--sglang-r3", "sglang_r3", type=click.Path(), default=None, metavar="FILE",
              help="Import SGLang's saved R3 routed experts (base64 of raw int32; physical slots).")
@click.option("--placement", type=click.Path(), default=None,
              help="With --sglang-r3: the placement the server ran with (its ids are physical slots).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights and the sample.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Statistics to write (.npz).")
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="Also write the raw per-token trace (.parquet, chunked).")
@click.option("--quiet", is_flag=True, help="No progress display (shown only on a terminal).")
def profile(hf_model, model, prompts, batch_size, max_length, max_new_tokens, max_prompts, sglang_url, duration,
            dump_dir, r3, sglang_r3, placement, seed, output, trace, quiet):
    """Capture routing from a running model into statistics that stats and solve read directly.

    \b
    Example:
        placer profile -o stats.npz                      # the embedded model, held-out text
        placer profile --hf-model mixtral --prompts p.jsonl --max-new-tokens 16 -o s.npz --trace t.parquet
        placer profile --sglang http://localhost:30000 --duration 60 --dump-dir /tmp -o s.npz
        placer profile --vllm-r3 outputs.jsonl --model qwen3-30b-a3b -o s.npz
        placer profile --sglang-r3 outputs.jsonl --placement p.json -o s.npz
        placer solve stats.npz --gpus 4 -o p.json
    """
    from placer.profiling import profile as lib  # deferred: keeps numba off placer --help

    show = not quiet and sys.stderr.isatty()
    if model is not None:
        if model.lower() not in MODELS:
            raise InvalidInputError(f"{model!r} is not a model preset ({', '.join(MODELS)}); a checkpoint "
                                    "directory or a family to run is --hf-model", source="--model")
        if not (sglang_url or r3 or sglang_r3):
            raise InvalidInputError("--model gives the shape of --sglang or --vllm-r3 input; the model to run "
                                    "is --hf-model", source="--model")
        if hf_model is not None:
            raise InvalidInputError("give --model (a preset) or --hf-model, not both", source="--model")
    shape = model or hf_model
    if sum(bool(x) for x in (sglang_url, r3, sglang_r3)) > 1:
        raise InvalidInputError("give one of --sglang, --vllm-r3 and --sglang-r3", source="--sglang")
    r3_stack = "sglang" if sglang_r3 else "vllm"
    r3 = r3 or sglang_r3
    if (sglang_url or r3) and (prompts or trace or max_new_tokens):
        raise InvalidInputError("--prompts, --trace and --max-new-tokens apply to running a model, not to "
                                "--sglang or --vllm-r3", source="--sglang" if sglang_url else "--vllm-r3")
    if placement and not sglang_r3:
        raise InvalidInputError("--placement applies to --sglang-r3 imports (vLLM's R3 ids are logical already)",
                                source="--placement")
    if sglang_url:
        if dump_dir is None:
            raise InvalidInputError("--sglang needs --dump-dir (the server's recorder directory)", source="--dump-dir")
        outcome = lib.profile_sglang(sglang_url, duration, dump_dir, model=shape, seed=seed, output=output,
                                     progress=(lambda m: click.echo(f"... {m}", err=True)) if show else None)
    elif r3:
        outcome = lib.profile_r3(r3, model=shape, placement=placement, seed=seed, output=output, stack=r3_stack)
    else:
        outcome = lib.profile_hf(hf_model, prompts, batch_size=batch_size, max_length=max_length,
                                 max_new_tokens=max_new_tokens, max_prompts=max_prompts, seed=seed,
                                 output=output, trace=trace, progress=show)
    click.echo(_summary_line(outcome))
    rate = f" ({outcome.tokens_per_second:,.0f} tok/s)" if not (sglang_url or r3) else ""
    verb = "imported" if r3 else "profiled"  # an R3 file is read, not recorded
    click.echo(f"{verb} {outcome.source} in {outcome.seconds:.1f} s{rate}; wrote {output}"
               + (f" and {trace}" if trace else ""))
