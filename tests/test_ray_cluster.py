"""solve, sweep and the EP runtime on a real two-raylet Ray cluster (``ray start``, 127.0.0.1).

The module's cluster: ``ray start --head`` (4 CPUs) and a second raylet joined with
``ray start --address`` (2 CPUs and a custom resource ``second_node`` standing for a second
machine), each on its own ports and temp folder, token authentication on (as Ray 2.60 starts
it where a token exists). Every driver is a subprocess in its own process group (the test
process may hold the session's own Ray instance); the nodes are stopped by their process ids
at the end. The last test stops the second raylet in the middle of a live migration.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from raycluster import ROOT, Cluster, add_node, kill_group, ray_env, short_dir, start_head

pytest.importorskip("ray")
pytest.importorskip("torch")

from placer.cli import main  # noqa: E402
from placer.ilp import PlacementProblem, solve  # noqa: E402
from placer.ilp.simple import contiguous_map  # noqa: E402
from placer.io.placements import read_placement_json, write_placement_json  # noqa: E402
from placer.presets import make_topology  # noqa: E402
from placer.runtime.apply import embedded_model  # noqa: E402
from placer.stats import compute_stats  # noqa: E402
from placer.synthetic import synthesize_trace  # noqa: E402
from placer.types import Placement  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

PLACER = str(Path(sys.executable).with_name("placer"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = short_dir("rc-")
    try:
        home = base / "home"
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # as any local ray.init() leaves
        c = start_head(base, ray_env(home), num_cpus=4)
        try:
            add_node(c, num_cpus=2, resources={"second_node": 1})
            yield c
        finally:
            c.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(cluster: Cluster, args: list[str], *, timeout_s: float = 240, stdin: str | None = None
         ) -> subprocess.CompletedProcess:
    """A command (its own process group, killed after) with the cluster's HOME (its token)."""
    proc = subprocess.Popen(args, env=cluster.env, cwd=ROOT, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    finally:
        kill_group(proc.pid)
        proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _both(cluster: Cluster) -> set[str]:
    return {node.node_id for node in cluster.nodes}


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "mixtral.npz"
    assert main(["synth", "--model", "mixtral-8x7b", "--tokens", "1500", "--seed", "3", "-o", str(path)]) == 0
    return path


def test_the_cluster_has_two_raylets(cluster):
    head, second = cluster.nodes
    assert head.node_id and second.node_id and head.node_id != second.node_id


def test_solve_spreads_layer_searches_over_both_raylets_and_matches_the_local_pool(cluster, trace, tmp_path,
                                                                                   capsys):
    shape = ["--gpus", "4", "--nodes", "2", "--redundant", "4", "--method", "placer", "--seed", "5"]
    local = tmp_path / "local.json"
    assert main(["solve", str(trace), *shape, "--workers", "2", "-o", str(local), "--json"]) == 0
    capsys.readouterr()
    remote = tmp_path / "ray.json"
    run = _run(cluster, [PLACER, "solve", str(trace), *shape, "--ray-address", cluster.address, "-o", str(remote)])
    assert run.returncode == 0, run.stderr
    assert "Ray tasks on 2 node(s)" in run.stdout, run.stdout
    a, b = read_placement_json(local), read_placement_json(remote)
    np.testing.assert_array_equal(a.placement.physical_to_logical, b.placement.physical_to_logical)
    assert a.metrics["objective"]["value"] == b.metrics["objective"]["value"]


def test_sweep_runs_its_points_on_both_raylets(cluster, tmp_path):
    out = tmp_path / "sweep"
    run = _run(cluster, [PLACER, "simulate", "sweep", "--model", "mixtral-8x7b", "--gpus", "4,8", "--rates", "5,10",
                         "--method", "contiguous", "--duration", "0.3", "--prompt-len", "16", "--output-len", "4",
                         "--length-dist", "fixed", "--ray-address", cluster.address, "-o", str(out)])
    assert run.returncode == 0, run.stderr
    assert "points ran on 2 Ray node(s)" in run.stdout, run.stdout
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "gpus4-rate10", "gpus4-rate5", "gpus8-rate10", "gpus8-rate5"]
    assert all((out / p / "metrics.json").is_file() for p in ("gpus4-rate5", "gpus8-rate10"))


def test_serve_re_solves_on_the_cluster(cluster, tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    from serve_helpers import MODEL, TOPOLOGY, Client, shifted_load, wait_for

    initial, out = tmp_path / "initial.json", tmp_path / "placement.json"
    write_placement_json(initial, Placement(contiguous_map(4, 8, 8), 2, 8), model=MODEL, topology=TOPOLOGY,
                         dispatch="nearest", method="contiguous", status="feasible", solve_seconds=0.0)
    proc = subprocess.Popen([PLACER, "serve", "--initial", str(initial), "--port", "0", "-o", str(out),
                             "--interval", "0.1", "--ray-address", cluster.address], env=cluster.env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+) .*re-solves on the Ray cluster at "
                          + re.escape(cluster.address), line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        client = Client(match.group(1))
        assert client.post_stats({"load": shifted_load()})[0] == 202
        wait_for(lambda: client.metrics()["placer_placements_published_total"] == 1, what="a publication", timeout=120)
        assert read_placement_json(out).method == "eplb"
    finally:
        kill_group(proc.pid)
        proc.wait()


def _placements(tmp_path: Path) -> tuple[Path, Path]:
    """EPLB on the embedded model before and after a load change, 4 GPUs in 2 nodes."""
    model, topology = embedded_model(), make_topology("h100", gpus=4, nodes=2)
    paths = []
    for name, seed in (("old.json", 0), ("new.json", 7)):
        stats = compute_stats(synthesize_trace(model, 2000, seed=seed))
        placement = solve(PlacementProblem(stats, model, topology, 4), "eplb").placement
        path = tmp_path / name
        write_placement_json(path, placement, model=model, topology=topology, dispatch="nearest", method="eplb",
                             status="feasible", solve_seconds=0.0)
        paths.append(path)
    return paths[0], paths[1]


def test_apply_places_two_ranks_on_each_raylet_and_migrates_over_gloo(cluster, tmp_path):
    old, new = _placements(tmp_path)
    run = _run(cluster, [PLACER, "apply", "--placement", str(new), "--from", str(old), "--gpus", "4",
                         "--tokens", "32", "--warmup", "2", "--ray-address", cluster.address])
    assert run.returncode == 0, run.stdout + run.stderr
    head, second = (node.node_id[:8] for node in cluster.nodes)
    assert (f"4 ranks (Ray actors, gloo on CPU) on 2 Ray nodes (ranks 0-1 on {head}, ranks 2-3 on {second})"
            in run.stdout or
            f"4 ranks (Ray actors, gloo on CPU) on 2 Ray nodes (ranks 0-1 on {second}, ranks 2-3 on {head})"
            in run.stdout), run.stdout
    served = int(run.stdout.split("served ")[1].split(" batches")[0])
    assert f"verified against the single-process reference: {served}/{served} batches match" in run.stdout
    assert "every slot's checksum matches the authoritative copy" in run.stdout


STOP_DRIVER = """
import json, sys
import numpy as np
import torch
from placer.io.placements import read_placement_json
from placer.runtime.apply import ReferenceCache, resolve_model
from placer.runtime.deployment import Deployment
from placer.runtime.execute import execute_plan
from placer.runtime.model import reference_forward
from placer.runtime.plan import plan_migration

old, new = read_placement_json({old!r}), read_placement_json({new!r})
model, _ = resolve_model(new.model, None)
dep = Deployment(model, old.placement, new.topology, ray_address={address!r}, timeout_s=3.0)
with dep:
    print("NODES", json.dumps(dep.rank_nodes), flush=True)
    plan = plan_migration(old.placement, new.placement, new.topology, expert_bytes=dep.weights.expert_bytes,
                          max_experts_per_round=1)
    reference = ReferenceCache(lambda x: reference_forward(dep.weights, torch.from_numpy(x)).numpy())
    rng = np.random.default_rng(1)
    batches = (rng.standard_normal((32, model.hidden_size)).astype(np.float32) for _ in range(10**6))
    stopped = []

    def on_step(step, report):
        if not stopped:  # after the first step of the migration: the test stops the second raylet
            stopped.append(step)
            print("STOP", step, int((report.commit_step >= 0).sum()), plan.new.num_layers, flush=True)
            sys.stdin.readline()

    report = execute_plan(dep, plan, batches, reference=reference, on_step=on_step)
    print("RESULT", json.dumps({{
        "rounds": plan.num_rounds, "failed_steps": report.failed_steps, "batches": report.batches,
        "verified": report.verified, "mismatches": report.mismatches,
        "weights": dep.verify_all(), "nodes": dep.rank_nodes,
        "final": bool(np.array_equal(dep.placement.physical_to_logical, plan.new.physical_to_logical)),
        "restarted": sorted({{r for rec in report.recoveries for r in rec.restarted}}),
        "recoveries": [[rec.cause, round(rec.detect_s, 2), round(rec.rebuild_s, 2)] for rec in report.recoveries]}}),
        flush=True)
"""


def test_stopping_the_second_raylet_mid_migration_leaves_no_wrong_output(cluster, tmp_path):
    """Runs last in this module: it stops the cluster's second raylet (by its process id)."""
    old, new = _placements(tmp_path)
    code = textwrap.dedent(STOP_DRIVER).format(old=str(old), new=str(new), address=cluster.address)
    proc = subprocess.Popen([sys.executable, "-c", code], env=cluster.env, cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("STOP "):
                break
        head, second = cluster.nodes
        nodes = json.loads(next(x for x in lines if x.startswith("NODES "))[6:])
        assert sorted(set(nodes)) == sorted({head.node_id, second.node_id}), lines
        if not lines[-1].startswith("STOP "):
            proc.kill()
            pytest.fail("the driver ended before the migration:\n" + "".join(lines) + proc.communicate()[1][-3000:])
        _, _, committed, layers = lines[-1].split()
        assert int(committed) < int(layers), "the migration had ended: nothing was tested"
        second.stop()  # SIGTERM to its `ray start --block` (by pid): the raylet and its ranks go
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=240)
    finally:
        kill_group(proc.pid)
        proc.wait()
    assert proc.returncode == 0, "".join(lines) + out + err[-3000:]
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    print(result)  # the recovery's figures (pytest -s)
    lost = [r for r, node in enumerate(nodes) if node == second.node_id]
    assert result["failed_steps"], result  # the stop was noticed ...
    assert set(lost) <= set(result["restarted"]), result  # ... its ranks restarted ...
    assert set(result["nodes"]) == {head.node_id}, result  # ... on the remaining raylet
    assert result["verified"] == result["batches"] and not result["mismatches"], result  # no wrong output
    assert result["weights"] == [] and result["final"], result  # every slot as committed: the target
