"""Profile a transformers MoE model: load or build it, batch prompts through it (plain forward or
``generate()``) under a :class:`~placer.profiling.capture.RouterRecorder`, and stream the routing
into statistics and, optionally, a chunked Parquet trace.

``--model`` of ``placer profile`` is resolved here: nothing or ``embedded`` is the shipped
embedded model (:mod:`placer.profiling.embedded`); a directory with a ``config.json`` is loaded
with ``from_pretrained`` (local files only); a family name (``FAMILIES``) builds a tiny model of
that family from a config with seeded random weights, for testing the plumbing (random routers
route without structure).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from placer.errors import InvalidInputError, MissingDependencyError
from placer.profiling import embedded
from placer.profiling.capture import RouterRecorder, model_spec
from placer.types import ModelSpec, RoutingTrace

# Tiny random-weight configs: hidden 64, 3 layers, 8 experts, top-2, a byte vocabulary (259).
_COMMON = {"vocab_size": 259, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 1024, "bos_token_id": 256,
           "eos_token_id": 257, "pad_token_id": 258, "num_experts_per_tok": 2}
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8, "intermediate_size": 128}),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"num_experts": 8, "moe_intermediate_size": 64, "intermediate_size": 128, "head_dim": 16}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"num_experts": 8, "intermediate_size": 128}),
    "deepseek-v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {"n_routed_experts": 8, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
                     "first_k_dense_replace": 1, "moe_intermediate_size": 64, "intermediate_size": 128,
                     "kv_lora_rank": 32, "q_lora_rank": None, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
                     "v_head_dim": 16, "num_key_value_heads": 4}),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM",
                {"num_local_experts": 8, "intermediate_size": 64, "head_dim": 16, "sliding_window": 128,
                 "max_position_embeddings": 131072,
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "granite-moe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"num_local_experts": 8, "intermediate_size": 128}),
}


@dataclass
class LoadedModel:
    """A model ready to profile: the torch module, a tokenizer (``encode(text) -> ids``, pad/eos ids)
    and its ModelSpec."""

    model: Any
    tokenizer: Any
    spec: ModelSpec
    source: str


def _torch() -> Any:
    try:
        import torch  # deferred: optional extra (placer[profile])
        import transformers  # noqa: F401  # deferred: optional extra (placer[profile])
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "torch", "profile", "profiling a transformers model") from None
    return torch


class _HFTokenizer:
    """A transformers tokenizer behind the ByteTokenizer interface."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=True)["input_ids"])


def build_family(family: str, seed: int = 0) -> Any:
    """A tiny ``family`` model (``FAMILIES``) with weights drawn from ``seed``, in eval mode."""
    torch = _torch()
    import transformers  # deferred: optional extra (placer[profile]); _torch() checked it is there

    if family not in FAMILIES:
        raise InvalidInputError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}", source="--model")
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**_COMMON, **extra})
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = getattr(transformers, model_name)(config)
    return model.eval()


def load_model(name: str | None, *, seed: int = 0) -> LoadedModel:
    """Resolve ``--model``: None/"embedded", a local model directory, or a family name."""
    _torch()
    if name in (None, "embedded"):
        model = embedded.load_embedded()
        return LoadedModel(model, embedded.ByteTokenizer(), model_spec(model, embedded.NAME), "embedded")
    path = Path(name)
    if path.is_dir():
        return _load_dir(path)
    if name in FAMILIES:
        model = build_family(name, seed)
        return LoadedModel(model, embedded.ByteTokenizer(), model_spec(model, f"tiny-{name}"), f"tiny {name}")
    raise InvalidInputError(f"neither a model directory nor a family ({', '.join(FAMILIES)}, embedded)",
                            source=name)


def _load_dir(path: Path) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: optional extra

    if not (path / "config.json").is_file():
        raise InvalidInputError("model directory has no config.json", source=str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInputError(f"cannot load the model: {' '.join(str(exc).split())[:200]}",
                                source=str(path)) from None
    tokenizer: Any
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    try:
        if not any((path / f).is_file() for f in files):
            raise OSError("no tokenizer files")
        tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError, KeyError, TypeError):
        vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
        if vocab != embedded.VOCAB_SIZE:
            raise InvalidInputError("model directory has no tokenizer files (only byte-vocabulary models of "
                                    f"{embedded.VOCAB_SIZE} ids can use placer's byte tokenizer)", source=str(path)) from None
        tokenizer = embedded.ByteTokenizer()
    return LoadedModel(model, tokenizer, model_spec(model, path.name), str(path))


def read_prompts(path: str) -> list[str]:
    """Prompts of a file: JSONL (one JSON string, or an object with "prompt" or "text", per line)
    or plain text (one prompt per non-empty line)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError("file not found" if not p.exists() else "not a file", source=path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("not UTF-8 text", source=path) from None
    prompts: list[str] = []
    if p.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"line {n}: not valid JSON ({exc.msg})", source=path) from None
            value = rec if isinstance(rec, str) else (rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None)
            if not isinstance(value, str):
                raise InvalidInputError(f"line {n}: expected a JSON string or an object with a "
                                        "'prompt' or 'text' string", source=path)
            prompts.append(value)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InvalidInputError("holds no prompts", source=path)
    return prompts


def _batch(torch: Any, ids: list[list[int]], pad: int, left: bool) -> tuple[Any, Any]:
    """Pad token-id lists to ``input_ids`` and ``attention_mask`` int64 [B, S_max]."""
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        sl = slice(width - len(x), width) if left else slice(0, len(x))
        inp[i, sl] = torch.tensor(x, dtype=torch.long)
        mask[i, sl] = 1
    return inp, mask


def capture_chunks(loaded: LoadedModel, prompts: Sequence[str], *, batch_size: int = 8,
                   max_length: int = 512, max_new_tokens: int = 0, seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> Iterator[RoutingTrace]:
    """Run ``prompts`` through the model in batches and yield the routing of each forward.

    Prompts are tokenized and cut to ``max_length`` tokens. With ``max_new_tokens == 0`` each
    batch is one plain forward (right padding, every token prefill); otherwise ``generate()``
    (greedy, left padding) yields one prefill chunk and one decode chunk per new token.
    ``request_ids`` are prompt indices. Memory is one batch's routing at a time.
    """
    torch = _torch()
    if batch_size < 1 or max_length < 1 or max_new_tokens < 0:
        raise InvalidInputError("need batch_size >= 1, max_length >= 1, max_new_tokens >= 0", source="profile")
    tok, model = loaded.tokenizer, loaded.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[RoutingTrace] = []
    recorder = RouterRecorder(model, loaded.spec, out.append, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with recorder, torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = [tok.encode(p)[:max_length] for p in prompts[start:start + batch_size]]
            batch = [b for b in batch if b]
            if not batch:
                continue
            recorder.request_ids = torch.arange(start, start + len(batch)).numpy()
            left = max_new_tokens > 0
            inp, mask = _batch(torch, batch, pad, left)
            if left:
                model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
            else:
                model(input_ids=inp, attention_mask=mask, use_cache=False)
            tokens = sum(c.num_tokens for c in out)
            yield from out
            out.clear()
            if progress is not None:
                progress(len(batch), tokens)


def tee_into(chunks: Iterator[RoutingTrace], consume: Callable[[RoutingTrace], None]) -> Iterator[RoutingTrace]:
    """Yield ``chunks`` unchanged after handing each to ``consume``."""
    for chunk in chunks:
        consume(chunk)
        yield chunk
