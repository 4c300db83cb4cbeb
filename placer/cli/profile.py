"""The ``placer profile`` command (registered in :mod:`placer.cli`)."""

from __future__ import annotations

import click

from placer.cli.options import CONTEXT, FiniteFloat, echo_json
from placer.cli.progress import Progress, quiet_option
from placer.display import format_value
from placer.errors import InvalidInputError
from placer.presets import MODELS
from placer.profiling.summary import summarize


def _figures(outcome) -> dict:
    """The summary figures of a profile: tokens, shape, median load max/mean, affinity, phases."""
    s = summarize(outcome.stats["all"])
    m = outcome.model
    return {"model": m.name, "tokens": int(outcome.tokens), "moe_layers": m.num_moe_layers,
            "experts": m.num_experts, "top_k": m.top_k, "load_max_over_mean_median": float(s["median"]["max_over_mean"]),
            "affinity_top2_mean": float(s["mean"]["affinity"]) if "mean" in s else None,
            "marginal_top2_mean": float(s["mean"]["marginal"]) if "mean" in s else None,
            "phases": {p: int(outcome.stats[p].num_tokens) for p in outcome.stats if p != "all"}}


def _summary_line(f: dict) -> str:
    line = (f"{f['model']}: {f['tokens']:,} tokens, {f['moe_layers']} MoE layers, E={f['experts']}, "
            f"top_k={f['top_k']}; load max/mean median {f['load_max_over_mean_median']:.3f}")
    if f["affinity_top2_mean"] is not None:
        line += (f"; next-layer top-1 in top-2 successors {f['affinity_top2_mean']:.3f} vs "
                 f"{f['marginal_top2_mean']:.3f} marginal")
    if f["phases"]:
        line += "; phases " + ", ".join(f"{p} {n:,}" for p, n in f["phases"].items())
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
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary figures, the source, the rate and the files written as JSON.")
@quiet_option
def profile(hf_model, model, prompts, batch_size, max_length, max_new_tokens, max_prompts, sglang_url, duration,
            dump_dir, r3, sglang_r3, placement, seed, output, trace, as_json, quiet):
    """Capture routing from a running model into statistics that stats and solve read directly.

    \b
    Example:
        placer profile -o stats.npz                      # the embedded model, held-out text
        placer profile --hf-model mixtral --prompts p.jsonl --max-new-tokens 16 -o s.npz --trace t.parquet
        placer profile --sglang http://localhost:30000 --duration 60 --dump-dir /tmp -o s.npz
        placer profile --vllm-r3 outputs.jsonl --model qwen3-30b-a3b -o s.npz
        placer profile --sglang-r3 outputs.jsonl --placement p.json -o s.npz --json
        placer solve stats.npz --gpus 4 -o p.json
    """
    from placer.profiling import profile as lib  # deferred: keeps numba off placer --help

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
        with Progress("profile", total=duration, unit="s", clock=True, ticker=True, quiet=quiet) as bar:
            outcome = lib.profile_sglang(sglang_url, duration, dump_dir, model=shape, seed=seed, output=output,
                                         progress=lambda message: bar.update(note=message))
    elif r3:
        with Progress("profile", unit="s", clock=True, ticker=True, quiet=quiet) as bar:
            bar.update(note=f"importing {r3}")
            outcome = lib.profile_r3(r3, model=shape, placement=placement, seed=seed, output=output, stack=r3_stack)
    else:
        with Progress("profile", unit="prompts", quiet=quiet) as bar:
            outcome = lib.profile_hf(
                hf_model, prompts, batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
                max_prompts=max_prompts, seed=seed, output=output, trace=trace,
                progress=lambda done, total, tokens: bar.update(done, total=total, note=f"{tokens:,} tokens"))
    figures = _figures(outcome)
    verb = "imported" if r3 else "profiled"  # an R3 file is read, not recorded
    rate = outcome.tokens_per_second if not (sglang_url or r3) else None
    if as_json:
        echo_json({**figures, "source": outcome.source, "action": verb, "seconds": float(outcome.seconds),
                   "tokens_per_second": None if rate is None else float(rate), "output": output, "trace": trace})
        return
    click.echo(_summary_line(figures))
    shown = f" ({format_value('rate_tok_s', rate)})" if rate is not None else ""
    click.echo(f"{verb} {outcome.source} in {format_value('seconds', outcome.seconds)}{shown}; wrote {output}"
               + (f" and {trace}" if trace else ""))
