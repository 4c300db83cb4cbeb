"""The runtime's MoE block and reference forward, and ``placer apply``'s input handling (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from placer.cli import main
from placer.errors import InvalidInputError
from placer.io.placements import write_placement_json
from placer.types import ModelSpec, Placement, Topology

torch = pytest.importorskip("torch")

from placer.runtime.apply import contiguous_placement, embedded_model, resolve_model  # noqa: E402
from placer.runtime.model import init_weights, reference_forward, route, weight_checksum  # noqa: E402

MODEL = ModelSpec("tiny", 2, (0, 1), 8, 2, hidden_size=16, expert_ffn_size=24)


def dense_moe(weights, x: np.ndarray) -> np.ndarray:
    """Token by token in float64: RMS pre-norm, softmax over the top-k logits, SwiGLU, weighted
    sum, residual."""
    h, f = weights.hidden_size, weights.ffn_size
    x = x.astype(np.float64)
    for layer in range(weights.num_layers):
        out = np.zeros_like(x)
        normed = x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-6)
        for t in range(x.shape[0]):
            xt = normed[t]
            logits = weights.router[layer].astype(np.float64) @ xt
            top = np.argsort(-logits, kind="stable")[:weights.top_k]
            gate = np.exp(logits[top] - logits[top].max())
            gate /= gate.sum()
            for e, g in zip(top, gate, strict=True):
                flat = weights.experts[layer, e].astype(np.float64)
                w1, w3, w2 = flat[:f * h].reshape(f, h), flat[f * h:2 * f * h].reshape(f, h), flat[2 * f * h:].reshape(h, f)
                a = w1 @ xt
                out[t] += g * (w2 @ (a / (1 + np.exp(-a)) * (w3 @ xt)))
        x = x + out
    return x


def test_reference_forward_matches_a_dense_token_loop():
    weights = init_weights(MODEL, seed=3)
    x = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    got = reference_forward(weights, torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, dense_moe(weights, x), rtol=1e-4, atol=1e-5)


def test_a_deep_stack_stays_finite():
    deep = ModelSpec(name="deep", num_hidden_layers=32, moe_layer_ids=tuple(range(32)), num_experts=8, top_k=2,
                     hidden_size=64, expert_ffn_size=64)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32))
    y = reference_forward(init_weights(deep, seed=0), x)
    assert torch.isfinite(y).all() and float(y.abs().max()) < 1e4


def test_route_picks_the_largest_logits_and_normalises():
    router = torch.eye(4)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 1.0, 5.0]])
    ids, w = route(x, router, 2)
    assert ids.tolist() == [[1, 2], [3, 2]]
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert w[0, 0] > w[0, 1]


def test_weights_are_seeded_and_checksummed():
    a, b = init_weights(MODEL, seed=1), init_weights(MODEL, seed=1)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert a.checksums[1, 5] == weight_checksum(a.experts[1, 5])
    flipped = a.experts[1, 5].copy()
    flipped[7] = np.nextafter(flipped[7], np.float32(np.inf))
    assert weight_checksum(flipped) != a.checksums[1, 5]
    assert a.expert_bytes == 3 * 16 * 24 * 4
    with pytest.raises(InvalidInputError, match="unknown hidden"):
        init_weights(ModelSpec.from_shape(2, 8, 2))


def test_apply_model_defaults_to_the_embedded_shapes():
    emb = embedded_model()
    assert (emb.num_experts, emb.top_k, emb.hidden_size, emb.expert_ffn_size) == (8, 2, 128, 128)
    model, note = resolve_model(ModelSpec.from_shape(3, 8, 2, name="routing"), None)
    assert (model.num_moe_layers, model.hidden_size, model.expert_ffn_size) == (3, 128, 128)
    assert "embedded" in note
    with pytest.raises(InvalidInputError, match="--model"):
        resolve_model(ModelSpec.from_shape(3, 8, 2), "deepseek-v3")
    start = contiguous_placement(Placement(np.zeros((2, 12), int) + np.arange(12) % 8, 3, 8))
    assert start.physical_to_logical[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]


@pytest.mark.parametrize("args, message", [
    pytest.param(["--gpus", "2"], "--gpus: the placement spans 4 GPUs", id="gpus"),
    pytest.param(["--ranks", "4"], "--ranks is now --gpus", id="renamed-ranks"),
    pytest.param(["--model", "mixtral-8x7b"], "--model: model mixtral-8x7b has 32 MoE layers", id="model"),
    pytest.param(["--from", "missing.json"], "missing.json", id="from-missing"),
    pytest.param(["-o", "/dev/null/now.json"], "/dev/null/now.json: cannot write", id="output-before-work"),
])
def test_apply_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    model = ModelSpec.from_shape(2, 8, 2, name="routing")
    placement = Placement(np.tile(np.arange(12) % 8, (2, 1)), 3, 8)
    write_placement_json("new.json", placement, model=model, topology=Topology("t", 1, 4),
                         dispatch="nearest", method="contiguous", status="feasible", solve_seconds=0.0)
    assert main(["apply", "--placement", "new.json", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_reference_cache_recomputes_for_every_other_batch():
    """The reference of a batch is reused only for that same batch (a retry), never for a later
    batch that happens to reuse a freed batch's id (the cause of wrong "mismatches" under load)."""
    from placer.runtime.apply import ReferenceCache

    calls = []

    def compute(x):
        calls.append(1)
        return x * 2

    cache = ReferenceCache(compute)
    rng = np.random.default_rng(0)
    for _ in range(200):  # batches freed and reallocated in place: CPython reuses their ids
        x = np.empty((32, 128), np.float32)  # (an id-keyed cache returned 199 stale results here)
        x[:] = rng.standard_normal((32, 128))
        np.testing.assert_array_equal(cache(x), x * 2)
        np.testing.assert_array_equal(cache(x), x * 2)  # a retry of the same batch: cached
        del x
    assert len(calls) == 200
