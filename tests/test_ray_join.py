"""placer._ray.init joins a cluster ``ray start`` started, fails in one line, never by accident.

Offline (127.0.0.1 only). One ``ray start --head --block`` cluster for the module, on free
ports, with its own temp folder and HOME (so its token file is its own): started as Ray 2.60
starts it on a machine where ``ray.init()`` once ran (a token in ``~/.ray/auth_token``), i.e. with
token authentication on. Every driver is a subprocess in its own process group (the test process
may hold the session's shared Ray instance); each group, and the cluster's, is killed by its id
at the end. ``ray stop`` is never used: it stops every Ray process on the machine.
"""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from raycluster import ROOT, Cluster, start_head
from raycluster import free_ports as _free_ports
from raycluster import group_gone as _group_gone
from raycluster import kill_group as _kill_group
from raycluster import ray_env as _env
from raycluster import short_dir as _short_dir

from placer._ray import join_failure
from placer.ilp import PlacementProblem, solve
from placer.io.placements import write_placement_json
from placer.io.traces import write_trace_npz
from placer.presets import make_topology
from placer.stats import compute_stats
from placer.synthetic import synthesize_trace

ray = pytest.importorskip("ray")

from placer.runtime.apply import embedded_model  # noqa: E402

pytestmark = pytest.mark.timeout(120)


DRIVER = """
import sys, time
import ray
from placer._ray import init
from placer.errors import InvalidInputError
t0 = time.monotonic()
try:
    init({address!r}, "a test", include_dashboard=False, log_to_driver=False, configure_logging=False)
    answer = ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60)
    print("JOINED", answer, ray.get_runtime_context().gcs_address)
except InvalidInputError as exc:
    print("ERROR", exc)
print("SECONDS", round(time.monotonic() - t0, 1))
"""


def _drive(env: dict[str, str], address: str | None, *, prelude: str = "",
           timeout_s: float = 60) -> tuple[str, float]:
    """Run DRIVER in a subprocess (its own process group, killed after); its output, wall time."""
    code = textwrap.dedent(prelude) + DRIVER.format(address=address)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        _kill_group(proc.pid)
        proc.wait()
    return out, time.monotonic() - t0


def _line(out: str, tag: str) -> str:
    return next((line[len(tag) + 1:] for line in out.splitlines() if line.startswith(tag + " ")), "")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = _short_dir()
    try:
        home = base / "home"
        (home / ".ray").mkdir(parents=True)
        # what any local ray.init() leaves behind (Ray 2.60 writes ~/.ray/auth_token)
        (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
        c = start_head(base, _env(home))
        try:
            assert "Token authentication is enabled" in c.log.read_text()
            yield c
        finally:
            c.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---- joining a default `ray start` cluster ------------------------------------------------------


def _joined(out: str, cluster: Cluster) -> bool:
    answer, _, gcs = _line(out, "JOINED").partition(" ")
    return answer == "42" and gcs.endswith(f":{cluster.port}")


def test_joins_a_default_ray_start_cluster_with_token_authentication(cluster):
    out, _ = _drive(_env(cluster.home), cluster.address)
    assert _joined(out, cluster), out


def test_ray_address_in_the_environment_joins_too(cluster):
    out, _ = _drive(_env(cluster.home, RAY_ADDRESS=cluster.address), None)
    assert _joined(out, cluster), out


# ---- one line per cause, in seconds -------------------------------------------------------------


def test_a_refused_token_is_one_authentication_line(cluster):
    out, _ = _drive(_env(cluster.home, RAY_AUTH_TOKEN="0" * 64), cluster.address)
    assert _line(out, "ERROR") == (
        f"--ray-address: cannot join the Ray cluster at {cluster.address}: it requires token "
        "authentication and refused this process's token (from RAY_AUTH_TOKEN); set RAY_AUTH_TOKEN "
        "to the cluster's token (`ray get-auth-token` prints it on the head node), or "
        "RAY_AUTH_TOKEN_PATH to a file holding it"), out
    assert float(_line(out, "SECONDS")) < 5, out  # ray.init alone retries for 20 s


def test_a_missing_token_is_one_authentication_line(cluster):
    home = cluster.base / "home-without-token"
    home.mkdir(exist_ok=True)
    out, _ = _drive(_env(home), cluster.address)
    assert _line(out, "ERROR").startswith(
        f"--ray-address: cannot join the Ray cluster at {cluster.address}: it requires token "
        "authentication and this process has no token; set RAY_AUTH_TOKEN"), out
    out, _ = _drive(_env(cluster.home, RAY_AUTH_MODE="disabled"), cluster.address)
    assert _line(out, "ERROR").startswith(
        f"--ray-address: cannot join the Ray cluster at {cluster.address}: it requires token "
        "authentication and RAY_AUTH_MODE is 'disabled' here; set RAY_AUTH_MODE=token and"), out


def test_another_ray_version_is_one_line(cluster):
    # Ray's own check (the driver's versions against those the cluster recorded), this driver
    # claiming another Ray
    prelude = """
        import ray._private.utils as u
        _real = u.compute_version_info
        u.compute_version_info = lambda: ("2.59.0", _real()[1])
    """
    out, _ = _drive(_env(cluster.home), cluster.address, prelude=prelude)
    error = _line(out, "ERROR")
    assert error.startswith(f"--ray-address: cannot join the Ray cluster at {cluster.address}: it "
                            f"runs Ray {ray.__version__} on Python "), out
    assert "this process Ray 2.59.0 on Python" in error and "pip install 'ray==" in error, out


def test_a_port_that_is_no_ray_cluster_is_one_line(cluster):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        out, _ = _drive(_env(cluster.home), address, prelude="import placer._ray\n"
                                                              "placer._ray.PROBE_TIMEOUT_S = 2\n")
    assert _line(out, "ERROR").startswith(
        f"--ray-address: cannot join the Ray cluster at {address}: something accepts connections "
        "there but does not answer as a Ray cluster within 2 s"), out


def test_an_unreachable_address_is_one_line_within_seconds(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = _free_ports(1)[0]
    out, _ = _drive(_env(home), f"127.0.0.1:{port}", timeout_s=30)
    assert _line(out, "ERROR").startswith(f"--ray-address: no Ray cluster answers at 127.0.0.1:{port} "
                                          "(nothing accepted a connection within 5 s): check"), out
    assert float(_line(out, "SECONDS")) < 6, out


def test_messages_for_rays_exceptions():
    exc = ConnectionError("Failed to connect")
    exc.__cause__ = RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n"
                                 "    Python: 3.11.9\nThis process on node 10.0.0.2 was started with:\n"
                                 "    Ray: 2.59.1\n    Python: 3.11.9\n")
    assert join_failure("h:6379", exc) == (
        "cannot join the Ray cluster at h:6379: it runs Ray 2.60.0 on Python 3.11.9, this process "
        "Ray 2.59.1 on Python 3.11.9; run placer where both match the cluster's "
        "(pip install 'ray==2.60.0' on Python 3.11.9)")
    exc = ConnectionError("Failed to connect to Ray cluster at h:6379")
    exc.__cause__ = RuntimeError("No node info found matching attributes: '' when trying to resolve "
                                 "node to connect to.")
    assert join_failure("h:6379", exc).startswith(
        "cannot join the Ray cluster at h:6379: no Ray node runs on this machine")
    assert join_failure("h:6379", RuntimeError("Failed to connect to GCS. Last connection error: "
                                               "Traceback...\nRpcError: boom\n")) == \
        "cannot join the Ray cluster at h:6379: RpcError: boom"


# ---- no address: a local instance of its own, whatever the machine has ------------------------


def test_a_stale_cluster_address_is_never_joined_by_accident():
    base = _short_dir()
    try:
        dead = _free_ports(1)[0]
        (base / "ray").mkdir()
        (base / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")  # died without ray stop
        (base / "home").mkdir()
        env = _env(base / "home", RAY_TMPDIR=str(base))  # Ray's temp folder: $RAY_TMPDIR/ray
        out, seconds = _drive(env, None, timeout_s=45)
        answer, _, gcs = _line(out, "JOINED").partition(" ")
        assert answer == "42" and not gcs.endswith(f":{dead}"), out
        assert seconds < 30, out
        # "auto" asks for that cluster: the address and the file are named, in seconds
        out, seconds = _drive(env, "auto", timeout_s=30)
        assert _line(out, "ERROR").startswith(
            f"--ray-address: no Ray cluster answers at 127.0.0.1:{dead} (nothing accepted a "
            f"connection within 5 s), the address {base / 'ray' / 'ray_current_cluster'} records: "
            "a cluster that stopped without `ray stop`?"), out
        assert seconds < 15, out
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def stale(tmp_path_factory):
    """An environment whose Ray temp folder records a cluster that died without ``ray stop``,
    and the inputs the commands below read."""
    base = _short_dir()
    try:
        dead = _free_ports(1)[0]
        (base / "ray").mkdir()
        (base / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
        (base / "home").mkdir()
        files = tmp_path_factory.mktemp("stale-inputs")
        model = embedded_model()
        topology = make_topology("h100", gpus=4)
        placement = solve(PlacementProblem(compute_stats(synthesize_trace(model, 500, seed=1)), model, topology, 4),
                          "eplb").placement
        write_placement_json(files / "p.json", placement, model=model, topology=topology, dispatch="nearest",
                             method="eplb", status="feasible", solve_seconds=0.0)
        write_trace_npz(files / "t.npz", synthesize_trace(model, 500, seed=1))
        yield _env(base / "home", RAY_TMPDIR=str(base)), files, dead
    finally:
        shutil.rmtree(base, ignore_errors=True)


PLACER = str(Path(sys.executable).with_name("placer"))


@pytest.mark.parametrize("argv, joins", [
    (["apply", "--placement", "{files}/p.json", "--gpus", "4", "--tokens", "16", "--warmup", "1"], False),
    (["solve", "{files}/t.npz", "--gpus", "4", "--redundant", "4", "--method", "placer", "--ray-address", "auto",
      "-o", "{files}/out.json"], True),
    (["simulate", "sweep", "--model", "mixtral-8x7b", "--gpus", "4", "--method", "contiguous", "--duration", "0.2",
      "--ray-address", "auto", "-o", "{files}/sweep"], True),
    (["serve", "--model", "mixtral-8x7b", "--gpus", "4", "--port", "0", "--ray-address", "auto"], True),
], ids=["apply", "solve", "sweep", "serve"])
def test_with_a_stale_cluster_address_every_ray_command_starts_or_fails_within_30_s(stale, argv, joins):
    env, files, dead = stale
    args = [PLACER, *(a.format(files=files) for a in argv)]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        _kill_group(proc.pid)
        proc.wait()
    seconds = time.monotonic() - t0
    if joins:  # asked for that cluster ("auto"): one line naming the address and the file, exit 2
        assert proc.returncode == 2, out + err
        assert err.strip().splitlines() == [
            f"placer: error: --ray-address: no Ray cluster answers at 127.0.0.1:{dead} (nothing accepted a "
            f"connection within 5 s), the address {Path(env['RAY_TMPDIR']) / 'ray' / 'ray_current_cluster'} "
            "records: a cluster that stopped without `ray stop`? Start one with `ray start --head`, or delete "
            "that file"], err
        assert seconds < 30, err
    else:  # no address: a local instance of its own, never the dead cluster
        assert proc.returncode == 0, out + err
        assert "batches match" in out and "every slot's checksum matches" in out, out
        value, unit = re.search(r"started in ([\d.]+) (s|ms);", out).groups()  # Ray and the 4 ranks
        assert float(value) * (1e-3 if unit == "ms" else 1.0) < 30, out


# ---- SIGTERM at any point -----------------------------------------------------------------------


SIGTERM_DRIVER = """
import time
from placer.cli.main import interrupts_as_exceptions
from placer._ray import init
with interrupts_as_exceptions():
    print("ENTER", flush=True)
    init({address!r}, "a test", include_dashboard=False, log_to_driver=False, configure_logging=False)
    print("STARTED", flush=True)
    time.sleep(60)
"""


def _sigterm_inside_init(env: dict[str, str], address: str | None, delay_s: float) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_DRIVER.format(address=address)], env=env,
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ENTER"
        time.sleep(delay_s)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(timeout=30)
        stopped_s = time.monotonic() - t0
        out = proc.stdout.read()
        assert code == 143, out  # placer's CLI exit code for SIGTERM
        assert "STARTED" not in out, "init ended before the signal: nothing was tested"
        assert stopped_s < 10, out
        assert _group_gone(proc.pid, 10), "processes ray.init started outlived it"
    finally:
        _kill_group(proc.pid)
        proc.wait()


def test_sigterm_while_starting_a_local_instance_stops_everything():
    base = _short_dir()
    try:
        (base / "home").mkdir()
        _sigterm_inside_init(_env(base / "home", RAY_TMPDIR=str(base)), None, delay_s=0.7)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_sigterm_while_waiting_on_an_address_stops_the_process(cluster):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        _sigterm_inside_init(_env(cluster.home), f"127.0.0.1:{silent.getsockname()[1]}", delay_s=1.5)
