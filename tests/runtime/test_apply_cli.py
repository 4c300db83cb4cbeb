"""``placer apply``: a live migration on a local 4-rank CPU deployment, outputs verified throughout."""

from __future__ import annotations

import numpy as np
import pytest

from placer.cli import main
from placer.ilp import PlacementProblem, solve
from placer.io.placements import export_placement, read_placement_json, write_placement_json
from placer.presets import make_topology
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace

pytest.importorskip("torch")
pytest.importorskip("ray")

from placer.runtime.apply import embedded_model  # noqa: E402


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_apply_migrates_live_with_verified_outputs(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = embedded_model()
    topology = make_topology("h100", gpus=4, nodes=1)
    for name, seed in (("old.json", 0), ("new.json", 7)):  # EPLB before and after a load change
        stats = compute_stats(synthesize_trace(model, 2000, seed=seed))
        placement = solve(PlacementProblem(stats, model, topology, 4), "eplb").placement
        write_placement_json(name, placement, model=model, topology=topology, dispatch="nearest",
                             method="eplb", status="feasible", solve_seconds=0.0)
    # The running server's file (TensorRT-LLM's YAML) as --from, DeepSeek's EPLB arrays as the target.
    export_placement(read_placement_json("old.json").placement, "trtllm", "old.yaml", model=model, topology=topology)
    export_placement(read_placement_json("new.json").placement, "eplb", "new.npz", model=model, topology=topology)
    code = main(["apply", "--placement", "new.npz", "--from", "old.yaml", "--deployment", "local",
                 "--gpus", "4", "--tokens", "32", "--warmup", "2", "-o", "running.json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model placer-embedded-mixtral: 4 MoE layers x 8 experts, top-2, hidden 128, expert FFN 128" in out
    assert "plan: " in out and " rounds " in out
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    assert header.split() == ["layer", "transfers", "sent", "commit", "step", "pause"]  # one row per layer below
    assert "0 recoveries" in out
    served = int(out.split("served ")[1].split(" batches")[0])
    assert f"verified against the single-process reference: {served}/{served} batches match" in out
    assert "every slot's checksum matches the authoritative copy" in out
    running = read_placement_json("running.json").placement
    new = read_placement_json("new.json").placement
    # What runs is the requested placement up to a relabel of GPUs: same experts per GPU, per layer.
    def per_gpu(p):
        return sorted(map(tuple, np.sort(p.gpu_experts().transpose(1, 0, 2), axis=2).reshape(4, -1)))
    assert per_gpu(running) == per_gpu(new)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_apply_json_is_one_document_of_the_plan_layers_and_checks(ray_session, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    model = embedded_model()
    topology = make_topology("h100", gpus=4, nodes=1)
    for name, seed in (("old.json", 0), ("new.json", 7)):
        stats = compute_stats(synthesize_trace(model, 2000, seed=seed))
        write_placement_json(name, solve(PlacementProblem(stats, model, topology, 4), "eplb").placement, model=model,
                             topology=topology, dispatch="nearest", method="eplb", status="feasible",
                             solve_seconds=0.0)
    code = main(["apply", "--placement", "new.json", "--from", "old.json", "--gpus", "4", "--tokens", "16",
                 "--warmup", "1", "-o", "running.json", "--json", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    doc = json.loads(out)  # nothing but the document on stdout
    assert doc["ok"] and doc["verified"] == doc["served"]["batches"] and doc["weight_mismatches"] == 0
    assert doc["deployment"]["ranks"] == 4 and doc["model"]["moe_layers"] == 4
    assert len(doc["layers"]) == 4 and sum(row["transfers"] for row in doc["layers"]) == doc["plan"]["transfers"]
    assert doc["plan"]["bytes_moved"] <= doc["plan"]["naive_bytes"] and doc["output"] == "running.json"
    assert "placer apply" not in err  # --quiet: no progress


def test_a_lost_cluster_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    """A ClusterError (a rank or node lost for good) is neither bad input (2) nor a bug (1 with a
    --debug hint): exit 1 with the message on one line."""
    import placer.runtime.apply as apply_mod
    from placer.runtime.deployment import RankLostError

    model = embedded_model()
    topology = make_topology("h100", gpus=4, nodes=1)
    placement = solve(PlacementProblem(compute_stats(synthesize_trace(model, 500, seed=0)), model, topology, 4),
                      "eplb").placement
    write_placement_json(tmp_path / "p.json", placement, model=model, topology=topology, dispatch="nearest",
                         method="eplb", status="feasible", solve_seconds=0.0)

    def lost(*_a, **_k):
        raise RankLostError("rank 2 did not come back within 120 s after step 5: a Ray node that held ranks "
                            "left the cluster and no remaining node has room for its bundle of the placement group")

    monkeypatch.setattr(apply_mod, "apply_live", lost)
    code = main(["apply", "--placement", str(tmp_path / "p.json"), "--gpus", "4"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().splitlines() == [
        "placer: error: rank 2 did not come back within 120 s after step 5: a Ray node that held ranks left the "
        "cluster and no remaining node has room for its bundle of the placement group"]
