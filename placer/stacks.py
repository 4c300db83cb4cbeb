"""Serving stacks placer targets, each pinned to the release whose code it reproduces.

A :class:`Stack` bundles what ``--stack`` selects at once: the placement file format the
stack loads (or None: it loads none), its exact dispatch rule (:mod:`placer.metrics.dispatch`), the
models it can place, and the release the rule, format and flags were checked against (the
tests in ``tests/stacks/`` run that release's own code). The flags themselves are written next
to the file by :func:`placer.io.placements.export_placement`.
"""

from __future__ import annotations

from dataclasses import dataclass

from placer.errors import InvalidInputError
from placer.types import ModelSpec

# Preset -> the Hugging Face architecture its checkpoints declare (config.json "architectures").
ARCHITECTURES = {
    "mixtral-8x7b": "MixtralForCausalLM",
    "mixtral-8x22b": "MixtralForCausalLM",
    "deepseek-v2-lite": "DeepseekV2ForCausalLM",
    "deepseek-v3": "DeepseekV3ForCausalLM",
    "kimi-k2": "DeepseekV3ForCausalLM",
    "qwen3-30b-a3b": "Qwen3MoeForCausalLM",
    "qwen3-235b-a22b": "Qwen3MoeForCausalLM",
    "olmoe-1b-7b": "OlmoeForCausalLM",
    "gpt-oss-120b": "GptOssForCausalLM",
    "llama-4-maverick": "Llama4ForCausalLM",
    # placer's embedded profiling model (placer/profiling/embedded) is a small Mixtral.
    "placer-embedded-mixtral": "MixtralForCausalLM",
}

# SGLang 0.5.23 builds placement metadata only for model classes that define
# ``get_model_config_for_expert_location`` (python/sglang/srt/models/*.py); of the presets'
# architectures these do. For the others ``ModelConfigForExpertLocation.from_model_config``
# returns None, no metadata is built and dispatch asserts.
SGLANG_PLACEABLE = frozenset({"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM",
                              "GptOssForCausalLM"})


@dataclass(frozen=True)
class Stack:
    """One serving stack at one release.

    ``dispatch``: the rule its released code runs (:data:`placer.types.DISPATCH_RULES`), or None
    when placer does not reproduce it (then a rule must be named with ``--dispatch``);
    ``format``: the placement file it loads (a :data:`placer.io.placements.FORMATS` entry), or
    None when it loads none; ``distinct_per_gpu``: it cannot use two copies of one expert on one
    GPU (solvers never place them, export refuses them); ``checked``: how the rule, format and
    flags were checked ("run": the release's own code runs in ``tests/stacks``; "transcribed":
    read from its source, which cannot run here).
    """

    name: str
    release: str
    dispatch: str | None
    format: str | None
    summary: str
    distinct_per_gpu: bool = False
    checked: str = "run"

    @property
    def label(self) -> str:
        """``"sglang 0.5.23"``: the name and the release reproduced."""
        return f"{self.name} {self.release}"

    def check_model(self, model: ModelSpec, source: str = "--model") -> None:
        """Raise :class:`InvalidInputError` when this release cannot place ``model``."""
        if self.name != "sglang":
            return
        arch = ARCHITECTURES.get(model.name)
        if arch is not None and arch not in SGLANG_PLACEABLE:
            raise InvalidInputError(
                f"{self.label} cannot place {model.name}: its {arch} defines no expert-location config, so "
                f"SGLang builds no placement metadata and static dispatch fails; score the rule alone with "
                f"--dispatch sglang-static (no --stack), or place a model it supports "
                f"({', '.join(sorted(k for k, v in ARCHITECTURES.items() if v in SGLANG_PLACEABLE))})",
                source=source)

    def model_note(self, model: ModelSpec) -> str | None:
        """A caveat for a model whose architecture placer does not know (not a preset), else None."""
        if self.name != "sglang" or model.name in ARCHITECTURES:
            return None
        return (f"{model.name} is not a preset: {self.label} places it only if its architecture defines "
                f"get_model_config_for_expert_location (of the presets': {', '.join(sorted(SGLANG_PLACEABLE))})")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "release": self.release}


STACKS: dict[str, Stack] = {s.name: s for s in (
    Stack("sglang", "0.5.23", "sglang-static", "sglang",
          "--init-expert-location file, static dispatch over DeepEP (--moe-a2a-backend deepep)"),
    Stack("vllm", "0.34.0", "vllm", None,
          "no placement file: vLLM's own EPLB re-balances every step_interval steps"),
    Stack("vllm-ascend", "0.23.0.post1", "vllm-ascend", "vllm-ascend",
          "eplb_config.expert_map_path JSON per MoE layer and device; rank r uses copy r % n; one copy "
          "per device", distinct_per_gpu=True),
    Stack("trtllm", "1.2", None, "trtllm",
          "moe_config.load_balancer YAML keyed by decoder layer; needs attention DP and EP > 1; its replica "
          "choice is not reproduced (name --dispatch)", checked="transcribed"),
)}


def get_stack(name: str, source: str = "--stack") -> Stack:
    """The stack called ``name``; unknown names raise :class:`InvalidInputError`."""
    try:
        return STACKS[name]
    except KeyError:
        raise InvalidInputError(f"unknown stack {name!r}; known: "
                                + ", ".join(s.label for s in STACKS.values()), source=source) from None


def resolve_dispatch(dispatch: str | None, stack: Stack | None, model: ModelSpec | None = None, *,
                     fallback: str = "nearest", source: str = "--model") -> str:
    """The rule to run: ``dispatch`` when given, else ``stack``'s, else ``fallback``.

    With a stack and a model, first checks that the stack can place the model
    (:meth:`Stack.check_model`, naming ``source``).
    """
    if stack is not None and model is not None:
        stack.check_model(model, source=source)
    if dispatch:
        return dispatch
    if stack is None:
        return fallback
    if stack.dispatch is None:
        raise InvalidInputError(f"placer does not reproduce {stack.label}'s replica choice (its kernel source "
                                "cannot be installed here); name the rule to score under with --dispatch "
                                "(e.g. nearest, placer's idealised rule, or vllm, a hash spread over copies)",
                                source="--stack")
    return stack.dispatch


def stack_help() -> str:
    """One line for ``--stack``'s help."""
    return ("Serving stack to reproduce (file format, dispatch rule, constraints, flags): "
            + "; ".join(f"{s.label}" + (" (transcribed)" if s.checked == "transcribed" else "")
                        for s in STACKS.values()) + ".")
