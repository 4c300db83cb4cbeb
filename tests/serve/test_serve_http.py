"""The service driven for real over HTTP on localhost."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
from serve_helpers import MODEL, TOPOLOGY, noisy_uniform, shifted_load, wait_for

from placer.app.serve import PolicyConfig
from placer.io.placements import read_placement_json

REQUIRED_METRICS = ("placer_imbalance", "placer_predicted_gain", "placer_last_solve_seconds",
                    "placer_placements_published_total", "placer_observations_total", "placer_bad_inputs_total")


def _gpus_of(p2l_row, experts, slots_per_gpu=2):
    return {int(np.flatnonzero(np.asarray(p2l_row) == e)[0]) // slots_per_gpu for e in experts}


@pytest.mark.timeout(60)
def test_endpoints_answer_and_metrics_have_help_and_type(start_service):
    _, client = start_service()
    assert client.get_json("/healthz") == {"status": "ok"}
    status, headers, body = client.request("GET", "/metrics")
    text = body.decode()
    for name in REQUIRED_METRICS:
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text
    m = client.metrics()
    assert m["placer_placements_published_total"] == 0 and m["placer_observations_total"] == 0
    assert np.isnan(m["placer_imbalance"])  # no observation yet
    doc = client.get_json("/placement?format=placer")
    assert doc["method"] == "contiguous"
    assert doc["physical_to_logical_map"] == [[0, 1, 2, 3, 4, 5, 6, 7]] * 4
    assert client.get_json("/placement?format=sglang") == {"physical_to_logical_map": [[0, 1, 2, 3, 4, 5, 6, 7]] * 4}
    status, _, body = client.request("GET", "/placement?format=vllm")  # vLLM 0.34.0 loads no file
    assert status == 400 and "unknown format 'vllm'" in json.loads(body)["error"]
    assert client.request("GET", "/nope")[0] == 404
    status, headers, _ = client.request("GET", "/stats")
    assert status == 405 and headers["Allow"] == "POST"
    assert client.get_json("/status")["origin"].startswith("initial placement: contiguous")


@pytest.mark.timeout(60)
def test_token_required_when_configured(start_service):
    _, client = start_service(token="s3cret")
    for path in ("/healthz", "/metrics", "/placement"):
        status, headers, body = client.request("GET", path, token=None)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert "token" in json.loads(body)["error"]
    assert client.request("GET", "/healthz", token="wrong")[0] == 401
    status, body = client.post_stats({"load": shifted_load()}, token=None)
    assert status == 401
    assert client.get_json("/healthz") == {"status": "ok"}
    assert client.metrics()["placer_observations_total"] == 0  # the unauthorised post was not taken


@pytest.mark.timeout(60)
def test_bad_posts_get_400_and_the_service_survives(start_service):
    service, client = start_service()
    good = shifted_load()
    cases = [
        (b"{not json", "not valid JSON"),
        (json.dumps({"load": good[:3]}).encode(), "has shape [3, 8], expected [4, 8]"),
        (json.dumps({"load": [row[:7] for row in good]}).encode(), "has shape [4, 7]"),
        (json.dumps({"load": [[-1.0] + row[1:] for row in good]}).encode(), "negative"),
        (b'{"load": [[NaN, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1],'
         b' [1, 1, 1, 1, 1, 1, 1, 1]]}', "NaN"),
        (json.dumps({"load": [["a"] * 8] * 4}).encode(), "nested list of numbers"),
        (json.dumps({"loads": good}).encode(), "unknown key(s) loads"),
        (json.dumps([1, 2]).encode(), "JSON object"),
        (json.dumps({"load": [[0.0] * 8] * 4}).encode(), "all zero"),
        (json.dumps({"load": good, "num_tokens": -3}).encode(), "num_tokens"),
        (json.dumps({"load": good, "top1_transitions": [[[1.0] * 8] * 8] * 2}).encode(), "top1_transitions"),
    ]
    for body, needle in cases:
        status, reply = client.post_stats(body)
        assert status == 400, (needle, reply)
        assert needle in reply["error"] and "\n" not in reply["error"], (needle, reply)
    # A body cut short of its Content-Length (the client closes its side).
    host, port = service.address
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(b"POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b'{"load": [[1, 2')
        sock.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: sock.recv(65536), b""))
    assert reply.startswith(b"HTTP/1.0 400") and b"body truncated: 15 of 500 bytes" in reply
    m = client.metrics()
    assert m["placer_bad_inputs_total"] == len(cases) + 1 and m["placer_observations_total"] == 0
    assert client.get_json("/healthz") == {"status": "ok"}
    status, reply = client.post_stats({"load": good, "num_tokens": 1000,
                                       "top1_transitions": [[[1.0] * 8] * 8] * 3})
    assert status == 202 and reply == {"accepted": True, "observations_total": 1}


@pytest.mark.timeout(60)
def test_load_shift_publishes_a_new_placement(start_service, tmp_path):
    out = tmp_path / "placement.json"
    sgl = tmp_path / "sglang.json"
    service, client = start_service(output_path=str(out), exports=(("sglang", str(sgl)),))
    before = read_placement_json(out).placement.physical_to_logical
    assert _gpus_of(before[0], (0, 1)) == {0}  # both hot experts start on GPU 0
    status, _ = client.post_stats({"load": shifted_load(), "num_tokens": 50_000})
    assert status == 202
    m = wait_for(lambda: (m := client.metrics())["placer_placements_published_total"] >= 1 and m,
                 what="a publication")
    assert m["placer_placements_published_total"] == 1
    assert m["placer_predicted_gain"] > 0.05 and m["placer_last_solve_seconds"] >= 0
    decision = client.get_json("/status")["last_decision"]
    assert decision["publish"] and decision["net_gain"] > decision["threshold"] == 0.05
    assert decision["candidate_imbalance"] < decision["current_imbalance"]
    status, headers, body = client.request("GET", "/placement?format=sglang")
    assert status == 200 and headers["X-Placer-Published"] == "1"
    doc = json.loads(body)
    assert list(doc) == ["physical_to_logical_map"] and len(doc["physical_to_logical_map"]) == MODEL.num_hidden_layers
    for row in doc["physical_to_logical_map"]:
        assert sorted(row) == list(range(8)) and len(_gpus_of(row, (0, 1))) == 2  # hot experts split
    # The files were rewritten with the same placement (atomically, by the library writers).
    pf = read_placement_json(out)
    assert pf.placement.physical_to_logical.tolist() == doc["physical_to_logical_map"]
    assert pf.method == "eplb" and pf.topology == TOPOLOGY
    assert json.loads(sgl.read_text()) == doc
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # The window now matches the placement: evaluating again publishes nothing new.
    client.post_stats({"load": shifted_load()})
    wait_for(lambda: client.get_json("/status")["evaluated_observations"] == 2, what="second evaluation")
    assert client.metrics()["placer_placements_published_total"] == 1


@pytest.mark.timeout(60)
def test_noise_below_the_threshold_is_not_published(start_service):
    service, client = start_service()
    for seed in range(3):
        assert client.post_stats({"load": noisy_uniform(seed)})[0] == 202
    wait_for(lambda: client.get_json("/status")["evaluated_observations"] == 3, what="evaluation of all posts")
    m = client.metrics()
    assert m["placer_placements_published_total"] == 0 and m["placer_evaluations_total"] >= 1
    decision = client.get_json("/status")["last_decision"]
    assert not decision["publish"]
    assert decision["net_gain"] is None or decision["net_gain"] < 0.05
    assert client.get_json("/placement")["physical_to_logical_map"] == [[0, 1, 2, 3, 4, 5, 6, 7]] * 4


@pytest.mark.timeout(60)
def test_migration_cost_over_a_short_horizon_blocks_the_same_shift(start_service):
    # The same shift as above, but the migration must pay for itself within 1 microsecond (the
    # method's answer as it is: the rule blocks it).
    _, client = start_service(policy=PolicyConfig(threshold=0.05, horizon_s=1e-6, movement_aware=False))
    client.post_stats({"load": shifted_load()})
    wait_for(lambda: client.get_json("/status")["evaluated_observations"] == 1, what="an evaluation")
    decision = client.get_json("/status")["last_decision"]
    assert decision["gain"] > 0.05 and decision["migration_s"] > 0
    assert decision["migration_cost"] == pytest.approx(decision["migration_s"] / 1e-6)
    assert not decision["publish"] and client.metrics()["placer_placements_published_total"] == 0


@pytest.mark.timeout(60)
def test_a_movement_aware_re_solve_over_a_short_horizon_keeps_the_running_placement(start_service):
    _, client = start_service(policy=PolicyConfig(threshold=0.05, horizon_s=1e-6))
    client.post_stats({"load": shifted_load()})
    wait_for(lambda: client.get_json("/status")["evaluated_observations"] == 1, what="an evaluation")
    decision = client.get_json("/status")["last_decision"]
    assert decision["reason"] == "the candidate is the current placement" and not decision["publish"]
    # over the default horizon the same shift is worth a move: published
    _, client = start_service(policy=PolicyConfig(threshold=0.05))
    client.post_stats({"load": shifted_load()})
    wait_for(lambda: client.metrics()["placer_placements_published_total"] == 1, what="a publication")


def _write_stat_dump(path, load):
    torch = pytest.importorskip("torch")
    torch.save({"logical_count": torch.tensor(np.asarray(load, dtype=np.int64)[None])}, str(path))


@pytest.mark.timeout(60)
def test_watched_dir_skips_malformed_and_truncated_dumps(start_service, tmp_path):
    watch = tmp_path / "dumps"
    watch.mkdir()
    (watch / "garbage.npz").write_bytes(b"PK\x03\x04 this is not a zip")
    (watch / "broken.json").write_text('{"0": [[1, 2], [3')
    full = tmp_path / "full.pt"
    _write_stat_dump(full, shifted_load())
    data = full.read_bytes()
    (watch / "truncated.pt").write_bytes(data[: len(data) // 2])
    (watch / ".hidden.pt").write_bytes(b"ignored")
    service, client = start_service(watch_dir=str(watch))
    wait_for(lambda: client.metrics()["placer_bad_inputs_total"] >= 3, what="bad files counted")
    assert client.get_json("/healthz") == {"status": "ok"}
    # A good SGLang stat dump landing later is read, and the shift it carries is published.
    _write_stat_dump(watch / "expert_distribution_recorder_1.pt", shifted_load())
    wait_for(lambda: client.metrics()["placer_placements_published_total"] >= 1, what="publication from a dump")
    m = client.metrics()
    assert m["placer_bad_inputs_total"] == 3 and m["placer_observations_total"] == 1


@pytest.mark.timeout(60)
def test_restart_resumes_from_the_state_file(start_service, tmp_path):
    state = tmp_path / "state.json"
    watch = tmp_path / "dumps"
    watch.mkdir()
    _write_stat_dump(watch / "dump0.pt", shifted_load(hot=(2, 3)))
    first, client = start_service(state_path=str(state), watch_dir=str(watch))
    wait_for(lambda: client.metrics()["placer_placements_published_total"] >= 1, what="publication")
    client.post_stats({"load": noisy_uniform(7, sigma=0.01)})
    wait_for(lambda: client.get_json("/status")["evaluated_observations"] == 2, what="evaluation")
    placement = client.get_json("/placement")["physical_to_logical_map"]
    counters = client.get_json("/status")["counters"]
    first.stop()
    assert json.loads(state.read_text())["kind"] == "placer-serve-state"

    second, client2 = start_service(state_path=str(state), watch_dir=str(watch))
    status = client2.get_json("/status")
    assert status["origin"] == f"resumed from state file {state}"
    assert status["counters"] == counters and status["evaluated_observations"] == 2
    assert client2.get_json("/placement")["physical_to_logical_map"] == placement
    assert client2.get_json("/placement")["method"] == "eplb"
    second.scan_once()
    second.scan_once()  # the dump already read before the restart is not read again
    m = client2.metrics()
    assert m["placer_observations_total"] == 2 and m["placer_placements_published_total"] == 1
    assert m["placer_imbalance"] < 1.5  # the resumed window, scored on the resumed placement
