"""``placer profile``: capture routing from a running model and write native statistics.

Three sources, one output (a stats ``.npz`` carrying the model's shape, so ``placer stats`` and
``placer solve`` take it without ``--model``):

* :func:`profile_hf`: a transformers model (the embedded default, a local directory, or a tiny
  family model) run on prompts under router hooks; statistics per phase, optionally the raw
  per-token trace as chunked Parquet.
* :func:`profile_sglang`: a live SGLang server's expert-distribution recorder.
* :func:`profile_r3`: saved vLLM/SGLang R3 routed experts, mapped through a placement.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from placer.errors import InvalidInputError
from placer.io.native import write_stats_npz, write_trace_parquet
from placer.presets import MODELS, get_model
from placer.profiling import embedded
from placer.profiling.capture import model_spec
from placer.profiling.hf import (
    _COMMON,
    FAMILIES,
    _torch,
    capture_chunks,
    load_model,
    read_prompts,
    tee_into,
)
from placer.profiling.sglang_driver import profile_sglang as record
from placer.profiling.vllm_r3 import stream_r3
from placer.stats import DEFAULT_SAMPLE_SIZE, StatsBuilder
from placer.types import ModelSpec, RoutingStats


@dataclass(frozen=True)
class ProfileOutcome:
    """What a profile run wrote: statistics per phase ("all" and each phase seen), the model,
    tokens, wall seconds and tokens/s of the capture, and the files."""

    stats: dict[str, RoutingStats]
    model: ModelSpec
    tokens: int
    seconds: float
    source: str
    output: str
    trace: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _write(output: str, stats: dict[str, RoutingStats]) -> None:
    if not output.endswith(".npz"):
        raise InvalidInputError("statistics are written as .npz", source=output)
    write_stats_npz(output, stats)


def _by_phase(builder: StatsBuilder) -> dict[str, RoutingStats]:
    out = {"all": builder.result("all")}
    for phase in ("prefill", "decode"):
        s = builder.result(phase)
        if s.num_tokens:
            out[phase] = s
    return out


def profile_hf(model: str | None = None, prompts: str | None = None, *, batch_size: int = 8,
               max_length: int = 256, max_new_tokens: int = 0, max_prompts: int | None = None,
               seed: int = 0, sample_size: int = DEFAULT_SAMPLE_SIZE, output: str,
               trace: str | None = None,
               progress: Callable[[int, int, int], None] | None = None) -> ProfileOutcome:
    """Profile a transformers model (``model``: None/"embedded", a directory, or a family) on the
    prompts of a text/JSONL file (default: the embedded model's held-out standard-library text).
    ``progress(prompts_done, prompts, tokens_done)`` is called after every batch.

    Memory is bounded by the statistics plus one batch: chunks stream into a StatsBuilder and,
    with ``trace`` (.parquet), into a Parquet writer.
    """
    if not output.endswith(".npz"):
        raise InvalidInputError("statistics are written as .npz", source=output)
    if trace is not None and not trace.endswith(".parquet"):
        raise InvalidInputError("the raw trace is written as .parquet", source=trace)
    for path in (output, trace):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise InvalidInputError("cannot write: the directory does not exist", source=path)
    texts = read_prompts(prompts) if prompts else embedded.heldout_prompts(max_bytes=max(1, max_length - 1))
    if max_prompts is not None:
        texts = texts[:max_prompts]
    loaded = load_model(model, seed=seed)
    spec = loaded.spec
    builder = StatsBuilder(spec.num_moe_layers, spec.num_experts, spec.top_k, sample_size=sample_size,
                           seed=seed, model=spec)
    done = [0, 0]  # prompts, tokens

    def batch_done(prompts_in_batch: int, tokens_in_batch: int) -> None:
        done[0] += prompts_in_batch
        done[1] += tokens_in_batch
        if progress is not None:
            progress(done[0], len(texts), done[1])

    start = time.perf_counter()
    chunks = tee_into(capture_chunks(loaded, texts, batch_size=batch_size, max_length=max_length,
                                     max_new_tokens=max_new_tokens, seed=seed, progress=batch_done), builder.update)
    if trace is not None:
        write_trace_parquet(trace, chunks)
    else:
        for _ in chunks:
            pass
    seconds = time.perf_counter() - start
    if builder.result("all").num_tokens == 0:
        raise InvalidInputError("the prompts hold no tokens", source=prompts or "prompts")
    stats = _by_phase(builder)
    _write(output, stats)
    return ProfileOutcome(stats, spec, stats["all"].num_tokens, seconds, loaded.source, output, trace)


def spec_of(name: str | None) -> ModelSpec | None:
    """``--model`` of the import modes: a preset name, a model directory or a family (its shape
    only: the model is built on torch's meta device, no weights), or None."""
    if name is None:
        return None
    if name in MODELS:
        return get_model(name)
    if not Path(name).is_dir() and name not in FAMILIES and name != "embedded":
        raise InvalidInputError(f"neither a preset ({', '.join(MODELS)}), a model directory nor a family "
                                f"({', '.join(FAMILIES)})", source=name)
    return _meta_spec(name)


def _meta_spec(name: str) -> ModelSpec:
    torch = _torch()
    import transformers  # deferred: optional extra (placer[profile]); _torch() checked it is there

    if name == "embedded":
        config: Any = transformers.MixtralConfig(**json.loads(embedded.CONFIG_FILE.read_text()))
        label = embedded.NAME
    elif name in FAMILIES:
        config_name, _, extra = FAMILIES[name]
        config = getattr(transformers, config_name)(**{**_COMMON, **extra})
        label = f"tiny-{name}"
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInputError(f"cannot read the model config: {' '.join(str(exc).split())[:200]}",
                                    source=name) from None
        label = Path(name).name
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model_spec(model, label)


def profile_sglang(url: str, duration_s: float, dump_dir: str, *, model: str | None = None,
                   seed: int = 0, output: str, progress=None) -> ProfileOutcome:
    """Record ``duration_s`` seconds of a live SGLang server and write the statistics."""
    if not output.endswith(".npz"):
        raise InvalidInputError("statistics are written as .npz", source=output)
    start = time.perf_counter()
    routing = record(url, duration_s, dump_dir, model=spec_of(model), seed=seed, progress=progress)
    seconds = time.perf_counter() - start
    _write(output, {"all": routing.stats})
    return ProfileOutcome({"all": routing.stats}, routing.model, routing.stats.num_tokens, seconds,
                          ", ".join(routing.sources), output)


def profile_r3(path: str, *, model: str | None = None, placement: str | None = None, seed: int = 0,
               sample_size: int = DEFAULT_SAMPLE_SIZE, output: str, stack: str = "vllm",
               chunk_tokens: int | None = None) -> ProfileOutcome:
    """Import saved R3 routed experts of ``stack`` (vllm: logical ids; sglang: physical slots,
    mapped through ``placement`` when given) into statistics.

    The file is read chunk by chunk (:func:`~placer.profiling.vllm_r3.stream_r3`; ``chunk_tokens``
    tokens, default about :data:`~placer.profiling.vllm_r3.CHUNK_MB` MiB of routing): memory is
    bounded by the statistics plus one chunk, whatever the file's length.
    """
    if not output.endswith(".npz"):
        raise InvalidInputError("statistics are written as .npz", source=output)
    start = time.perf_counter()
    builder: StatsBuilder | None = None
    spec: ModelSpec | None = None
    for chunk in stream_r3(path, model=spec_of(model), placement=placement, stack=stack, chunk_tokens=chunk_tokens):
        if builder is None:
            spec = chunk.model or ModelSpec.from_shape(chunk.num_layers, chunk.num_experts, chunk.top_k, name="r3")
            builder = StatsBuilder(chunk.num_layers, chunk.num_experts, chunk.top_k, sample_size=sample_size,
                                   seed=seed, model=spec)
        builder.update(chunk)
    assert builder is not None and spec is not None  # stream_r3 yields at least one chunk
    stats = {"all": builder.result("all", final=True)}
    _write(output, stats)
    return ProfileOutcome(stats, spec, stats["all"].num_tokens, time.perf_counter() - start, path, output)
