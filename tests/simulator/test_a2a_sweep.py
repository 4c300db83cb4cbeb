"""The a2a benchmark (DeepEP-style routing, bottleneck bandwidth) and local sweeps."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from placer.app.sweep import SWEEP_COLUMNS, SweepSpec, point_name, run_sweep
from placer.app.workflow import write_synthetic
from placer.errors import InvalidInputError
from placer.ilp.simple import contiguous_map
from placer.io.placements import write_placement_json
from placer.presets import get_model, make_topology
from placer.simulator.a2a import a2a_benchmark, random_routing
from placer.simulator.config import ReplayWorkload, ServingWorkload
from placer.simulator.results import read_results
from placer.types import ModelSpec, Placement

pytestmark = pytest.mark.timeout(60)

SMALL = dict(tokens_per_rank=32, top_k=6, hidden=512, experts=64, groups=8, topk_groups=2)


def reference_scores(num_tokens, num_experts, seed):
    """The scores random_routing draws (one chunk: fewer than 8192 tokens)."""
    return np.abs(np.random.default_rng(seed).standard_normal((num_tokens, num_experts))) + 1.0


def test_random_routing_ids_are_distinct_and_the_top_scores_highest_first():
    ids = random_routing(500, 64, 6, seed=7)
    assert ids.shape == (500, 6) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 64
    assert (np.diff(np.sort(ids, axis=1), axis=1) > 0).all()  # distinct per token
    scores = reference_scores(500, 64, 7)
    picked = np.take_along_axis(scores, ids, axis=1)
    assert (np.diff(picked, axis=1) <= 0).all()  # highest first
    np.testing.assert_array_equal(picked[:, -1], -np.sort(-scores, axis=1)[:, 5])  # the top 6
    np.testing.assert_array_equal(random_routing(500, 64, 6, seed=7), ids)
    assert not np.array_equal(random_routing(500, 64, 6, seed=8), ids)


@pytest.mark.parametrize("topk_groups", [1, 2, 4])
def test_group_limited_routing_stays_within_topk_groups(topk_groups):
    ids = random_routing(800, 64, 4, groups=8, topk_groups=topk_groups, seed=1)
    assert (np.diff(np.sort(ids, axis=1), axis=1) > 0).all()
    groups = np.sort(ids // 8, axis=1)
    per_token = (np.diff(groups, axis=1) != 0).sum(axis=1) + 1
    assert per_token.max() <= topk_groups
    if topk_groups > 1:
        assert per_token.max() > 1  # the limit binds, it does not collapse to one group
    # The chosen groups are those with the best single score.
    scores = reference_scores(800, 64, 1).reshape(800, 8, 8).max(axis=2)
    best = np.argsort(-scores, axis=1)[:, :topk_groups]
    assert all(set(g) <= set(b) for g, b in zip(ids // 8, best, strict=True))


def test_random_routing_rejects_impossible_shapes():
    with pytest.raises(InvalidInputError, match="groups"):
        random_routing(10, 64, 4, groups=7)
    with pytest.raises(InvalidInputError):
        random_routing(10, 64, 4, groups=8, topk_groups=9)
    with pytest.raises(InvalidInputError, match="top-9"):
        random_routing(10, 64, 9, groups=8, topk_groups=1)


KEYS = {"kernel", "cluster", "ep", "nodes", "routing", "tokens_per_rank", "top_k", "hidden", "experts",
        "bottleneck", "dispatch_us", "combine_us", "dispatch_gbps", "combine_gbps", "dispatch_bytes_per_rank",
        "combine_bytes_per_rank", "deepep_count", "deepep_dispatch_gbps", "deepep_combine_gbps"}


def test_ep8_is_nvlink_bound_and_ep16_rdma_bound():
    ep8 = a2a_benchmark(cluster="h800", ep=8, routing="group-limited", **SMALL)
    ep16 = a2a_benchmark(cluster="h800", ep=16, routing="group-limited", **SMALL)
    assert set(ep8) == set(ep16) == KEYS
    assert (ep8["bottleneck"], ep8["nodes"]) == ("nvlink", 1)
    assert (ep16["bottleneck"], ep16["nodes"]) == ("rdma", 2)
    assert ep8["deepep_dispatch_gbps"] is None and ep8["deepep_combine_gbps"] is None
    assert ep16["deepep_dispatch_gbps"] > 0 and ep16["deepep_combine_gbps"] > 0
    for r in (ep8, ep16):
        assert r["dispatch_us"] > 0 and r["combine_us"] > 0
        assert r["dispatch_gbps"] == pytest.approx(r["dispatch_bytes_per_rank"] / r["dispatch_us"] / 1e3)
        assert r["combine_gbps"] == pytest.approx(r["combine_bytes_per_rank"] / r["combine_us"] / 1e3)
        # fp8 dispatch, bf16 combine: the same tokens back at about twice the size.
        assert r["combine_bytes_per_rank"] > r["dispatch_bytes_per_rank"]
    # The bottleneck bandwidth never exceeds the link's.
    h800 = make_topology("h800", gpus=16)
    assert ep8["dispatch_gbps"] <= h800.nvlink_gbps and ep16["dispatch_gbps"] <= h800.nic_gbps


def test_low_latency_kernel_sends_more_rdma_bytes_than_the_normal_kernel():
    normal = a2a_benchmark(cluster="h800", ep=16, kernel="deepep-normal", **SMALL)
    ll = a2a_benchmark(cluster="h800", ep=16, kernel="deepep-ll", **SMALL)
    assert ll["kernel"] == "deepep-ll" and ll["bottleneck"] == "rdma"
    # Per (token, remote expert) at h + h/32 + 16 bytes, against per (token, remote node) at h + h/32.
    assert ll["dispatch_bytes_per_rank"] > normal["dispatch_bytes_per_rank"]


def test_a2a_rejects_uneven_experts():
    with pytest.raises(InvalidInputError, match="--gpus"):
        a2a_benchmark(ep=6, **SMALL)


def test_a2a_reads_routing_from_a_trace(tmp_path):
    path = str(tmp_path / "mix.npz")
    write_synthetic(get_model("mixtral-8x7b"), 256, seed=0, output=path)
    r = a2a_benchmark(cluster="h800", ep=8, tokens_per_rank=16, top_k=2, hidden=512, experts=8, routing=path)
    assert r["routing"] == path and r["dispatch_us"] > 0
    with pytest.raises(InvalidInputError, match="--experts 8 --top-k 2") as err:
        a2a_benchmark(cluster="h800", ep=8, tokens_per_rank=16, top_k=2, hidden=512, experts=16, routing=path)
    assert err.value.source == path


# --------------------------------------------------------------------------------------------
# Sweeps (local)
# --------------------------------------------------------------------------------------------

SERVING = dict(model="mixtral-8x7b", workload=ServingWorkload(duration_s=0.2, prompt_len=16, output_len=4,
                                                               length_dist="fixed"))


def test_point_names():
    assert point_name(8, 2.5) == "gpus8-rate2.5"
    assert point_name(None, 10.0) == "rate10"
    assert point_name(16, None) == "gpus16"
    assert point_name(None, None) == "point"


@pytest.mark.timeout(120)
def test_local_sweep_over_gpu_counts_and_rates(tmp_path):
    spec = SweepSpec(methods=("contiguous",), **SERVING)
    out = tmp_path / "sweep"
    table = run_sweep(spec, [4, 8], [5.0, 10.0], output=str(out), workers=1)
    assert list(table.columns) == list(SWEEP_COLUMNS)
    assert list(zip(table["gpus"], table["rate"], strict=True)) == [(4, 5.0), (4, 10.0), (8, 5.0), (8, 10.0)]
    assert (table["placement"] == "contiguous").all() and (table["throughput_tok_s"] > 0).all()
    csv = pd.read_csv(out / "sweep.csv")
    assert list(csv.columns) == list(SWEEP_COLUMNS) and len(csv) == 4
    for name in ("gpus4-rate5", "gpus4-rate10", "gpus8-rate5", "gpus8-rate10"):
        res = read_results(out / name)
        assert res.labels == ["contiguous"]
        assert res.inputs["workload"]["rate"] in (5.0, 10.0)
    assert (out / "report.html").stat().st_size > 0


@pytest.mark.timeout(120)
def test_sweep_placement_files_run_only_at_their_gpu_count(tmp_path):
    model = get_model("mixtral-8x7b")
    topo = make_topology("h100", gpus=4)
    path = str(tmp_path / "p4.json")
    write_placement_json(path, Placement(contiguous_map(32, 8, 8), 2, 8), model=model, topology=topo,
                         dispatch="nearest", method="mine", status="feasible", solve_seconds=0.0)
    spec = SweepSpec(placements=(path,), workload=ReplayWorkload(iterations=2, tokens_per_rank=4),
                     model="mixtral-8x7b")
    table = run_sweep(spec, [4, 8], [1.0, 2.0], output=str(tmp_path / "s"), workers=1)
    # Replay ignores rates (one point per GPU count); the 4-GPU file has no 8-GPU point.
    assert table[["point", "gpus", "placement"]].values.tolist() == [["gpus4", 4, "mine"]]
    assert table["rate"].isna().all()
    assert not os.path.exists(tmp_path / "s" / "gpus8" / "metrics.json")
    with pytest.raises(InvalidInputError, match="--method"):
        run_sweep(spec, [8], [1.0], output=str(tmp_path / "none"), workers=1)


def test_sweep_rejects_a_placement_for_another_model(tmp_path):
    other = ModelSpec(name="other", num_hidden_layers=2, moe_layer_ids=(0, 1), num_experts=8, top_k=2,
                      hidden_size=256, expert_ffn_size=512)
    topo = make_topology("h100", gpus=4)
    path = str(tmp_path / "other.json")
    write_placement_json(path, Placement(contiguous_map(2, 8, 8), 2, 8), model=other, topology=topo,
                         dispatch="nearest", method="x", status="feasible", solve_seconds=0.0)
    spec = SweepSpec(placements=(path,), **SERVING)
    with pytest.raises(InvalidInputError) as err:
        run_sweep(spec, [4], [5.0], output=str(tmp_path / "s"), workers=1)
    assert err.value.source == path


def test_an_unreachable_ray_address_is_one_clear_error(tmp_path, monkeypatch):
    import socket
    import types

    import placer._ray

    calls = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: calls.append(kw))
    monkeypatch.setattr(placer._ray, "import_ray", lambda what: fake)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = SweepSpec(methods=("contiguous",), model="mixtral-8x7b",
                     workload=ReplayWorkload(iterations=1, tokens_per_rank=4))
    with pytest.raises(InvalidInputError, match="no Ray cluster answers"):
        run_sweep(spec, [4, 8], [1.0], output=str(tmp_path / "s"), ray_address=f"127.0.0.1:{port}")
    assert calls == []  # never handed to ray.init, which would retry for minutes
