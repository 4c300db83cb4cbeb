"""Router hooks on tiny transformers models of every supported family: forward and generate()."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402

from placer.errors import InvalidInputError  # noqa: E402
from placer.io.traces import read_trace  # noqa: E402
from placer.profiling.capture import RouterRecorder, find_routers, model_spec  # noqa: E402
from placer.profiling.embedded import ByteTokenizer  # noqa: E402
from placer.profiling.hf import FAMILIES, LoadedModel, build_family, capture_chunks  # noqa: E402
from placer.profiling.profile import profile_hf  # noqa: E402
from placer.stats import compute_stats  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["def f(x):\n    return x + 1\n", "import os", "a", "class A:\n    pass\n" * 3]


def loaded(family: str, seed: int = 0) -> LoadedModel:
    model = build_family(family, seed)
    return LoadedModel(model, ByteTokenizer(), model_spec(model, f"tiny-{family}"), family)


def load_of(chunks, spec) -> np.ndarray:
    load = np.zeros((spec.num_moe_layers, spec.num_experts), np.int64)
    for c in chunks:
        for layer in range(spec.num_moe_layers):
            load[layer] += np.bincount(c.expert_ids[:, layer].ravel(), minlength=spec.num_experts)
    return load


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_capture_counts_every_real_token(family):
    lm = loaded(family)
    chunks = list(capture_chunks(lm, PROMPTS, batch_size=3))
    tokens = sum(len(ByteTokenizer().encode(p)) for p in PROMPTS)
    assert sum(c.num_tokens for c in chunks) == tokens
    load = load_of(chunks, lm.spec)
    assert (load.sum(axis=1) == tokens * lm.spec.top_k).all()
    for c in chunks:
        w = c.gate_weights
        assert (np.diff(w, axis=2) <= 1e-7).all(), "ids must be sorted by gate weight"
        assert (c.phase == 0).all()
    req = np.concatenate([c.request_ids for c in chunks])
    assert np.bincount(req).tolist() == [len(ByteTokenizer().encode(p)) for p in PROMPTS]


def test_deepseek_dense_layers_are_not_moe_layers():
    spec = loaded("deepseek-v3").spec
    assert spec.moe_layer_ids == (1, 2) and spec.num_hidden_layers == 3
    assert (spec.num_experts, spec.top_k, spec.num_groups, spec.topk_groups, spec.num_shared_experts) == (8, 2, 2, 1, 1)


def test_batched_padded_capture_equals_one_prompt_at_a_time():
    lm = loaded("mixtral", seed=3)
    batched = np.concatenate([c.expert_ids for c in capture_chunks(lm, PROMPTS, batch_size=4)])
    single = np.concatenate([c.expert_ids for c in capture_chunks(lm, PROMPTS, batch_size=1)])
    assert batched.shape == single.shape
    same = (np.sort(batched, axis=2) == np.sort(single, axis=2)).all(axis=2)
    assert same.mean() >= 0.99


def test_hook_ids_match_the_router_outputs():
    lm = loaded("olmoe", seed=1)
    got = []
    ids = torch.tensor([ByteTokenizer().encode("hello hooks")])
    with RouterRecorder(lm.model, lm.spec, got.append), torch.inference_mode():
        out = lm.model(input_ids=ids, output_router_logits=True)
    assert len(got) == 1 and got[0].num_tokens == ids.shape[1]
    for layer, logits in enumerate(out.router_logits):  # softmax/top-k router: top-k of the logits
        expect = torch.topk(logits.float().softmax(-1), lm.spec.top_k, dim=-1).indices.numpy()
        assert (got[0].expert_ids[:, layer] == expect).all()


@pytest.mark.parametrize("family", ["qwen3-moe", "mixtral"])
def test_generate_tags_prefill_and_decode(family):
    lm = loaded(family)
    tok = ByteTokenizer()
    prompts = ["x = 1", "for i in range(3):"]
    new = 4
    chunks = list(capture_chunks(lm, prompts, batch_size=2, max_new_tokens=new))
    phase = np.concatenate([c.phase for c in chunks])
    prompt_tokens = sum(len(tok.encode(p)) for p in prompts)
    assert (phase == 0).sum() == prompt_tokens
    # Decode inputs: every generated token but the last, except pads of finished sequences.
    batch = [tok.encode(p) for p in prompts]
    width = max(map(len, batch))
    inp = torch.tensor([[tok.pad_token_id] * (width - len(b)) + b for b in batch])
    mask = (inp != tok.pad_token_id).long()
    with torch.inference_mode():
        seq = lm.model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    generated = seq[:, width:-1]
    assert (phase == 1).sum() == int((generated != tok.pad_token_id).sum()) > 0
    load = load_of(chunks, lm.spec)
    assert (load.sum(axis=1) == len(phase) * lm.spec.top_k).all()


def test_model_without_routers_is_rejected():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(InvalidInputError, match="no router module"):
        find_routers(Plain())


def test_router_returning_logits_only_is_rejected():
    class FakeTopKRouter(torch.nn.Module):
        def forward(self, x):
            return x.reshape(-1, x.shape[-1])

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = FakeTopKRouter()

        def forward(self, x):
            self.gate(x)
            return x

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block()])

        def forward(self, input_ids=None):
            return self.layers[0](input_ids.float()[..., None].expand(-1, -1, 4))

    from placer.types import ModelSpec
    model = Fake()
    rec = RouterRecorder(model, ModelSpec.from_shape(1, 4, 2), lambda c: None)
    with rec, pytest.raises(InvalidInputError, match="not \\(logits, weights, top_k_index\\)"):
        model(input_ids=torch.ones(1, 3))


def test_profile_writes_stats_and_parquet_that_agree(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def g(): pass"}\n"plain string prompt"\n{"text": "x = [1, 2, 3]"}\n')
    out, trace = str(tmp_path / "s.npz"), str(tmp_path / "t.parquet")
    res = profile_hf("granite-moe", str(prompts), batch_size=2, max_new_tokens=3, output=out, trace=trace)
    stats = res.stats["all"]
    assert (stats.load.sum(axis=1) == stats.num_tokens * stats.top_k).all()
    assert set(res.stats) == {"all", "prefill", "decode"}
    assert res.stats["prefill"].num_tokens + res.stats["decode"].num_tokens == stats.num_tokens
    full = read_trace(trace)
    assert full.num_tokens == stats.num_tokens and full.model.name == "tiny-granite-moe"
    assert (compute_stats(full).load == stats.load).all()
    assert (compute_stats(full).top1_transitions == stats.top1_transitions).all()


def test_profile_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\nanother one\n\nthird\n")
    ra = profile_hf("mixtral", str(prompts), seed=5, output=a)
    rb = profile_hf("mixtral", str(prompts), seed=5, output=b)
    assert ra.tokens == rb.tokens == sum(len(s.encode()) + 1 for s in ("one prompt", "another one", "third"))
    with np.load(a) as za, np.load(b) as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            assert np.array_equal(za[k], zb[k]), k


def test_local_model_directory_loads_and_profiles(tmp_path):
    build_family("olmoe", seed=2).save_pretrained(tmp_path / "olmoe-tiny")
    prompts = tmp_path / "p.txt"
    prompts.write_text("alpha\nbeta gamma\n")
    res = profile_hf(str(tmp_path / "olmoe-tiny"), str(prompts), output=str(tmp_path / "s.npz"))
    assert res.model.name == "olmoe-tiny" and res.tokens == len("alpha") + len("beta gamma") + 2
    assert (res.stats["all"].load.sum(axis=1) == res.tokens * 2).all()
    with pytest.raises(InvalidInputError, match="no config.json"):
        profile_hf(str(tmp_path), str(prompts), output=str(tmp_path / "s2.npz"))
