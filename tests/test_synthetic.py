"""Synthetic routing: determinism, chunking, shapes, group limits, calibration, perturbation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from placer import synthetic as S
from placer.errors import InvalidInputError
from placer.presets import MODELS
from placer.synthetic import (
    DRIFT_BLOCK,
    PRESET_PROFILES,
    SyntheticProfile,
    perturbed,
    profile_for,
    routing_figures,
    synthesize,
    synthesize_trace,
)
from placer.types import ModelSpec, RoutingTrace

MIXTRAL = MODELS["mixtral-8x7b"]
DSV3 = MODELS["deepseek-v3"]


def _concat(chunks: list[RoutingTrace]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([c.expert_ids for c in chunks]),
            np.concatenate([c.gate_weights for c in chunks]))


def test_same_seed_same_arrays_other_seed_differs():
    a = synthesize_trace(MIXTRAL, 3000, seed=5)
    b = synthesize_trace(MIXTRAL, 3000, seed=5)
    c = synthesize_trace(MIXTRAL, 3000, seed=6)
    assert np.array_equal(a.expert_ids, b.expert_ids)
    assert np.array_equal(a.gate_weights, b.gate_weights)
    assert not np.array_equal(a.expert_ids, c.expert_ids)
    assert np.mean(a.expert_ids != c.expert_ids) > 0.3


def test_concatenation_independent_of_chunk_size():
    n = 2 * DRIFT_BLOCK + 777  # crosses drift epochs at odd offsets
    whole = synthesize_trace(MIXTRAL, n, seed=3)
    for chunk in (1000, 4096, 5555, n + 10):
        chunks = list(synthesize(MIXTRAL, n, seed=3, chunk_tokens=chunk))
        assert [c.num_tokens for c in chunks][:-1] == [chunk] * (len(chunks) - 1)
        ids, w = _concat(chunks)
        assert np.array_equal(ids, whole.expert_ids)
        assert np.array_equal(w, whole.gate_weights)
    small = list(synthesize(DSV3, 300, seed=1, chunk_tokens=7))
    assert np.array_equal(_concat(small)[0], synthesize_trace(DSV3, 300, seed=1).expert_ids)


def test_shapes_dtypes_and_metadata():
    for name, model in MODELS.items():
        tr = synthesize_trace(model, 64, seed=1)
        t, num_layers, k = 64, model.num_moe_layers, model.top_k
        assert tr.expert_ids.shape == (t, num_layers, k) and tr.expert_ids.dtype == np.int16, name
        assert tr.gate_weights.shape == (t, num_layers, k) and tr.gate_weights.dtype == np.float32
        assert tr.num_experts == model.num_experts and tr.order == "sorted" and tr.model == model
        assert tr.phase is None and tr.home_rank is None and tr.request_ids is None
        assert 0 <= tr.expert_ids.min() and tr.expert_ids.max() < model.num_experts
        s = np.sort(tr.expert_ids, axis=-1)
        assert not np.any(s[..., 1:] == s[..., :-1]), name  # distinct per token-layer
        w = tr.gate_weights
        assert np.allclose(w.sum(axis=-1), 1.0, atol=1e-5)
        assert np.all(np.diff(w, axis=-1) <= 0) and np.all(w > 0)


def test_phase_codes_and_streams():
    dec = next(synthesize(MIXTRAL, 500, phase="decode"))
    pre = next(synthesize(MIXTRAL, 500, phase="prefill"))
    assert dec.phase.dtype == np.int8 and np.all(dec.phase == 1) and np.all(pre.phase == 0)
    assert not np.array_equal(dec.expert_ids, pre.expert_ids)
    assert np.all(synthesize_trace(MIXTRAL, 10, phase="unknown").phase == -1)
    with pytest.raises(InvalidInputError):
        synthesize(MIXTRAL, 10, phase="training")


def test_empty_and_bad_arguments():
    assert list(synthesize(MIXTRAL, 0)) == []
    empty = synthesize_trace(MIXTRAL, 0)
    assert empty.expert_ids.shape == (0, 32, 2)
    with pytest.raises(InvalidInputError):
        synthesize(MIXTRAL, -1)
    with pytest.raises(InvalidInputError):
        synthesize(MIXTRAL, 10, chunk_tokens=0)
    with pytest.raises(InvalidInputError):
        SyntheticProfile(affinity=1.0)
    with pytest.raises(InvalidInputError):
        SyntheticProfile(skew=float("nan"))


def _groups_per_token(ids: np.ndarray, group_size: int) -> np.ndarray:
    g = np.sort(ids.astype(np.int64) // group_size, axis=-1)
    return 1 + np.sum(g[..., 1:] != g[..., :-1], axis=-1)


def test_group_limit_respected_for_deepseek_v3():
    tr = synthesize_trace(DSV3, 1500, seed=2)
    n_groups = _groups_per_token(tr.expert_ids, DSV3.num_experts // DSV3.num_groups)
    assert n_groups.max() <= DSV3.topk_groups
    assert n_groups.min() >= 2  # not trivially one group
    free = synthesize_trace(DSV3, 300, seed=2, profile=replace(profile_for(DSV3), group_limited=False))
    assert _groups_per_token(free.expert_ids, 32).max() > DSV3.topk_groups


def test_group_limit_with_exact_fallback_draws():
    # 2 groups of 2 experts allowed, K = 4: the allowed groups must be filled exactly, and the
    # extreme skew forces the kernel's exact (non-rejection) fallback path.
    model = ModelSpec(name="tight", num_hidden_layers=3, moe_layer_ids=(0, 1, 2), num_experts=16,
                      top_k=4, num_groups=8, topk_groups=2)
    prof = SyntheticProfile(skew=8.0, affinity=0.5, num_successors=4)
    tr = synthesize_trace(model, 400, profile=prof)
    assert _groups_per_token(tr.expert_ids, 2).max() <= 2
    bad = ModelSpec(name="bad", num_hidden_layers=1, moe_layer_ids=(0,), num_experts=8, top_k=4,
                    num_groups=8, topk_groups=2)
    with pytest.raises(InvalidInputError):
        synthesize_trace(bad, 10)


def test_python_kernel_matches_compiled(monkeypatch):
    if not S.HAVE_NUMBA:
        pytest.skip("numba missing: only the Python kernel exists")
    model = ModelSpec(name="tiny", num_hidden_layers=4, moe_layer_ids=(0, 1, 2, 3), num_experts=16,
                      top_k=3, num_groups=4, topk_groups=2)
    prof = SyntheticProfile(skew=3.0, affinity=0.6, num_successors=3, source_top1=0.5)
    compiled = synthesize_trace(model, 40, seed=9, profile=prof)
    # What runs without numba: the kernels as plain Python functions.
    monkeypatch.setattr(S, "_mix", S._mix.py_func)
    monkeypatch.setattr(S, "_uniform", S._uniform.py_func)
    st, key, _ = S._prepare(model, 40, 9, prof, None)
    ids = np.empty((40, 4, 3), np.int16)
    w = np.empty((40, 4, 3), np.float32)
    prob, alias_p, alias_i = st.tables(0)
    with np.errstate(over="ignore"):
        S._sample.py_func(np.int64(0), key, prob, alias_p, alias_i, st.successors, st.succ_cdf,
                          st.succ_weights, st.affinity, float(st.source_top1), st.group_limit,
                          np.int64(st.group_size), np.int64(st.topk_groups),
                          float(st.gate_ratio_low), ids, w)
    assert np.array_equal(ids, compiled.expert_ids)
    assert np.allclose(w, compiled.gate_weights)


def test_mixtral_calibration():
    f = routing_figures(synthesize_trace(MIXTRAL, 20000, seed=0).expert_ids, 8)
    assert 1.2 <= f["skew"] <= 1.45
    assert 0.48 <= f["affinity"] <= 0.60
    assert 0.28 <= f["marginal"] <= 0.40
    assert f["affinity"] > f["marginal"] + 0.1


def test_qwen3_skew():
    model = MODELS["qwen3-30b-a3b"]
    f = routing_figures(synthesize_trace(model, 5000, seed=0).expert_ids, model.num_experts)
    assert 5 <= f["skew"] <= 12
    assert f["pair_proxy"] > f["pair_marginal"] + 0.05


def test_profiles_pinned_per_preset_and_generic():
    assert set(PRESET_PROFILES) == set(MODELS)
    for name, model in MODELS.items():
        assert profile_for(model) is PRESET_PROFILES[name]
    renamed = replace(MIXTRAL, name="my-mixtral")  # generic, E/K = 4: Mixtral's knobs
    assert profile_for(renamed) == PRESET_PROFILES["mixtral-8x7b"]
    impostor = ModelSpec.from_shape(4, 64, 4, name="mixtral-8x7b")
    prof = profile_for(impostor)
    assert prof.num_successors == 4
    skews = [profile_for(ModelSpec.from_shape(2, e, 2)).skew for e in (8, 32, 128)]
    assert skews == sorted(skews) and skews[0] < skews[-1]
    assert profile_for(ModelSpec.from_shape(2, 4, 4)).skew == 0.0
    synthesize_trace(ModelSpec.from_shape(3, 12, 3), 100)  # E % num_successors != 0


def test_perturbed_profile_shifts_load_keeps_structure():
    model = MODELS["olmoe-1b-7b"]
    base = profile_for(model)
    assert perturbed(base, 0.0, 3) is base
    with pytest.raises(InvalidInputError):
        perturbed(base, -0.1, 3)
    pert = perturbed(base, 0.5, 3)
    assert pert.perturb_sigma == 0.5 and pert.perturb_seed == 3
    shape = (model.num_moe_layers, model.num_experts, model.top_k, 1, 1)
    s0, s1 = S._structure(shape, base), S._structure(shape, pert)
    assert np.array_equal(s0.successors, s1.successors)
    assert np.array_equal(s0.affinity, s1.affinity)
    assert not np.allclose(s0.logits, s1.logits)

    def loads(prof: SyntheticProfile, seed: int) -> np.ndarray:
        ids = synthesize_trace(model, 4000, seed=seed, profile=prof).expert_ids.astype(np.int64)
        off = (np.arange(model.num_moe_layers) * 64)[None, :, None]
        return np.bincount((ids + off).ravel(), minlength=16 * 64).reshape(16, 64) / (4000 * 8)

    ref, noise, shifted = loads(base, 0), loads(base, 1), loads(pert, 1)
    tv_noise = 0.5 * np.abs(ref - noise).sum(axis=1).mean()
    tv_pert = 0.5 * np.abs(ref - shifted).sum(axis=1).mean()
    assert tv_pert > 2 * tv_noise
    tr = synthesize_trace(model, 50, seed=1, profile=pert)
    assert tr.expert_ids.shape == (50, 16, 8)
