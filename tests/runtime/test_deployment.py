"""The EP runtime on Ray: forward vs the reference, live migration, and a rank killed mid-migration.

One 4-rank CPU deployment (2 MoE layers, 8 experts, hidden 64, expert FFN 128, 3 slots per rank)
serves every test of this module, on the session's shared ``ray.init(num_cpus=2)``.
"""

from __future__ import annotations

import numpy as np
import pytest

from placer.types import ModelSpec, Placement, Topology

torch = pytest.importorskip("torch")
pytest.importorskip("ray")

from placer.runtime import plan_migration  # noqa: E402
from placer.runtime.deployment import Deployment  # noqa: E402
from placer.runtime.execute import RuntimeTransferError, execute_plan  # noqa: E402
from placer.runtime.model import reference_forward  # noqa: E402

pytestmark = pytest.mark.ray

MODEL = ModelSpec("tiny-ep", 2, (0, 1), 8, 2, hidden_size=64, expert_ffn_size=128)
TOPOLOGY = Topology("local", 2, 2)  # 2 nodes x 2 ranks, so the 'nearest' rule has nodes to prefer
START = Placement([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3],
                   [7, 6, 5, 4, 3, 2, 1, 0, 4, 5, 6, 7]], 3, 8)
# Replicated experts (layer 0: expert 5 three times, two copies on one rank), experts moved
# between nodes, and (layer 1) a swap inside a rank as well.
TARGET = Placement([[5, 5, 1, 0, 2, 4, 7, 5, 3, 6, 2, 1],
                    [6, 0, 5, 4, 3, 2, 1, 7, 4, 5, 6, 3]], 3, 8)


def batches(seed: int, count: int, tokens: int = 24) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((tokens, MODEL.hidden_size)).astype(np.float32) for _ in range(count)]


@pytest.fixture(scope="module")
def deployment(ray_session):
    dep = Deployment(MODEL, START, TOPOLOGY, seed=5, timeout_s=5.0, max_restarts=2)
    dep.start()
    yield dep
    dep.shutdown()


def reference(dep: Deployment):
    return lambda x: reference_forward(dep.weights, torch.from_numpy(x)).numpy()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rows, dispatch", [
    pytest.param(START.physical_to_logical, "nearest", id="contiguous"),
    pytest.param(TARGET.physical_to_logical, "nearest", id="replicas-nearest"),
    pytest.param(TARGET.physical_to_logical, "vllm", id="replicas-vllm"),
    pytest.param([[3, 3, 3, 0, 1, 2, 4, 5, 6, 7, 3, 3], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 0]],
                 "sglang-static", id="hot-expert-everywhere"),
])
def test_forward_equals_the_single_process_reference(deployment, rows, dispatch):
    deployment.reload(Placement(rows, 3, 8), dispatch=dispatch)
    ref = reference(deployment)
    for x in [*batches(1, 2), batches(2, 1, tokens=3)[0]]:  # 3 tokens: one rank has none
        y = deployment.forward(x)
        np.testing.assert_allclose(y, ref(x), rtol=1e-4, atol=1e-4)
    assert deployment.verify_all() == []
    deployment.reload(START, dispatch="nearest")


@pytest.mark.timeout(90)
def test_live_migration_serves_correct_outputs_and_switches_layer_by_layer(deployment):
    deployment.reload(START)
    plan = plan_migration(START, TARGET, TOPOLOGY, expert_bytes=deployment.weights.expert_bytes,
                          max_experts_per_round=1)
    assert len(plan.transfers) and len(plan.local_copies)
    seen = []
    report = execute_plan(deployment, plan, batches(3, 40), reference=reference(deployment),
                          on_step=lambda step, _r: seen.append(deployment.placement.physical_to_logical.copy()))
    assert report.mismatches == [] and report.verified == report.batches == report.steps
    assert report.recoveries == []
    np.testing.assert_array_equal(deployment.placement.physical_to_logical, plan.new.physical_to_logical)
    assert deployment.verify_all() == []
    # Each layer ran its old map until its commit step and the new one from then on; a layer
    # commits one step after its last transfer round (a round per step, rounds from step 0).
    for layer in range(2):
        k = int(report.commit_step[layer])
        assert k == plan.commit_round[layer] + 1
        for step, p2l in enumerate(seen):
            expected = plan.new if step >= k else START
            np.testing.assert_array_equal(p2l[layer], expected.physical_to_logical[layer])
    assert report.pause_s.max() < 1.0


@pytest.mark.timeout(120)
def test_rank_killed_mid_migration_loses_no_request(deployment, ray_session):
    ray = ray_session
    deployment.reload(START)
    size = deployment.weights.expert_bytes  # staging for 2 experts: the layers move one after the other
    plan = plan_migration(START, TARGET, TOPOLOGY, expert_bytes=size, staging_bytes=2 * size,
                          max_experts_per_round=1)
    first = int(np.argmin(plan.commit_round))
    last = int(np.argmax(plan.commit_round))
    # Kill after the first layer committed, while the other has staged but uncommitted experts.
    kill_at = int(plan.commit_round[first]) + 1
    assert kill_at < plan.commit_round[last], "the plan leaves no step to kill the rank mid-migration"
    staged = (plan.transfers.layer == last) & (plan.transfers.round <= kill_at)  # step k runs round k
    victim = int(plan.transfers.dst_gpu[staged][0])
    log = {}

    def on_step(step, report):
        p2l = deployment.placement.physical_to_logical
        if step == kill_at:
            assert np.array_equal(p2l[first], plan.new.physical_to_logical[first])
            assert np.array_equal(p2l[last], START.physical_to_logical[last])
            log["pid"] = ray.get(deployment.actors[victim].ping.remote())[1]
            ray.kill(deployment.actors[victim], no_restart=False)  # for real: the process dies
        elif report.recoveries and "after" not in log:
            log["after"] = p2l.copy()

    stream = batches(4, 30)
    it = iter(stream)
    ref = reference(deployment)
    report = execute_plan(deployment, plan, it, reference=ref, on_step=on_step, keep_outputs=True)
    rest = list(it)
    outputs = report.outputs + [deployment.forward(x) for x in rest]
    # Every request answered, once, correctly; the rank was restarted and rebuilt.
    assert len(outputs) == len(stream)
    for x, y in zip(stream, outputs, strict=True):
        np.testing.assert_allclose(y, ref(x), rtol=1e-4, atol=1e-4)
    assert report.mismatches == []
    # One recovery restarted the killed rank, detected at the next step. On a loaded machine a
    # collective may also time out and rebuild the groups once more: allowed, but it restarts no rank.
    killed = [rec for rec in report.recoveries if rec.restarted]
    assert len(killed) == 1, report.recoveries
    (rec,) = killed
    assert rec.restarted == [victim] and kill_at + 1 in report.failed_steps
    assert rec.detect_s < deployment.timeout_s + 2
    assert ray.get(deployment.actors[victim].ping.remote())[1] != log["pid"]
    # The uncommitted layer stayed on the old placement after the fault, then committed.
    np.testing.assert_array_equal(log["after"][last], START.physical_to_logical[last])
    assert report.commit_step[last] > kill_at + 1
    np.testing.assert_array_equal(deployment.placement.physical_to_logical, plan.new.physical_to_logical)
    assert deployment.verify_all() == []


@pytest.mark.timeout(90)
def test_a_transfer_failing_its_checksum_is_not_committed(deployment):
    deployment.reload(START)
    plan = plan_migration(START, TARGET, TOPOLOGY, expert_bytes=deployment.weights.expert_bytes,
                          max_experts_per_round=1)
    # The controller's authoritative checksum of the first transferred expert no longer matches
    # what its source rank sends: the receiving rank must refuse it and the layer stay old.
    layer, expert = int(plan.transfers.layer[0]), int(plan.transfers.expert[0])
    sums = deployment.weights.checksums
    saved = sums[layer, expert]
    sums[layer, expert] = "0" * len(saved)
    try:
        with pytest.raises(RuntimeTransferError, match=f"layer {layer}: expert {expert} .* fails its checksum"):
            execute_plan(deployment, plan, batches(4, 40), reference=reference(deployment))
        np.testing.assert_array_equal(deployment.placement.physical_to_logical[layer],
                                      START.physical_to_logical[layer])
    finally:
        sums[layer, expert] = saved
        deployment.reload(START)
