"""Real Ray clusters for the tests: ``ray start`` processes on 127.0.0.1, stopped by their ids.

A node is one ``ray start --block`` process in its own process group, on free ports, with its
own temp folder (a short path: Ray's unix sockets live there). Stopping a node sends SIGTERM to
that process (``--block``: it stops the node's raylet and workers and exits) and then kills its
process group; nothing is stopped by name (``ray stop`` would stop every Ray process on the
machine, the test session's own instance included).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[1]
_DROP = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR")
_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
               "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def short_dir(prefix: str = "rj-") -> Path:
    # Ray's unix socket paths live under its temp folder: pytest's tmp_path is too long for them
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def ray_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without Ray's address and token settings, HOME at ``home``, placer importable."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def group_gone(pgid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@dataclass
class Node:
    """One ``ray start --block`` process (its pid is its process group's id)."""

    proc: subprocess.Popen
    temp: Path
    log: Path
    node_id: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to this node's ``ray start`` (it stops the node), then kill its process group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        kill_group(self.proc.pid)
        self.proc.wait()


@dataclass
class Cluster:
    base: Path
    port: int
    home: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"  # Ray records the node's own IP; any local one joins

    @property
    def log(self) -> Path:
        return self.nodes[0].log

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def _start(cmd: list[str], env: dict[str, str], temp: Path, log: Path) -> Node:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Node(proc, temp, log)


def _wait(node: Node, ready, what: str, within_s: float = 90.0) -> None:
    deadline = time.monotonic() + within_s
    while not (up := ready()) and node.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not up:
        node.stop()
        raise RuntimeError(f"{what} did not come up:\n{node.log.read_text()[-3000:]}")


def start_head(base: Path, env: dict[str, str], *, num_cpus: int = 1, home: Path | None = None) -> Cluster:
    """``ray start --head --block`` on 127.0.0.1, on free ports, temp folder under ``base``."""
    ports = free_ports(1 + len(_PORT_FLAGS))
    temp, log = base / "t", base / "head.log"
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(ports[0]),
           "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
           "--temp-dir", str(temp)]
    for flag, port in zip(_PORT_FLAGS, ports[1:], strict=True):
        cmd += [flag, str(port)]
    node = _start(cmd, env, temp, log)
    _wait(node, (temp / "ray_current_cluster").exists, "ray start --head")
    return Cluster(base, ports[0], home or Path(env["HOME"]), env, [node])


def add_node(cluster: Cluster, *, num_cpus: int, resources: dict[str, float], name: str = "node2",
             token_mode: bool = True) -> Node:
    """A second raylet on this machine (``ray start --address``), its own ports, temp folder and
    custom resources; returns once the cluster lists it (its id in ``node.node_id``)."""
    ports = free_ports(len(_PORT_FLAGS))
    temp, log = cluster.base / name, cluster.base / f"{name}.log"
    cmd = [RAY, "start", "--block", f"--address={cluster.address}", "--node-ip-address", "127.0.0.1",
           "--num-cpus", str(num_cpus), "--resources", json.dumps(resources), "--disable-usage-stats",
           "--temp-dir", str(temp)]
    for flag, port in zip(_PORT_FLAGS, ports, strict=True):
        cmd += [flag, str(port)]
    # a node joins a cluster with token authentication in token mode (Ray's docs set it so)
    env = {**cluster.env, "RAY_AUTH_MODE": "token"} if token_mode else cluster.env
    node = _start(cmd, env, temp, log)
    cluster.nodes.append(node)
    key = next(iter(resources))
    seen: list[list] = []

    def joined() -> bool:
        seen[:] = _live_nodes(cluster)
        return any(key in names for _, names in seen)

    _wait(node, joined, f"ray start --address={cluster.address}")
    node.node_id = next(n for n, names in seen if key in names)
    cluster.nodes[0].node_id = next(n for n, names in seen if "node:__internal_head__" in names)
    return node


def _live_nodes(cluster: Cluster) -> list[list]:
    """[node id, resource names] of every live node (asked by a driver of its own)."""
    code = (f"import json, ray; from placer._ray import init; init({cluster.address!r}, 'a test', "
            "include_dashboard=False, log_to_driver=False, configure_logging=False); "
            "print('NODES', json.dumps([[n['NodeID'], list(n['Resources'])] for n in ray.nodes() if n['Alive']]))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True,
                             timeout=60, cwd=ROOT).stdout
    except subprocess.TimeoutExpired:
        return []
    line = next((x for x in out.splitlines() if x.startswith("NODES ")), "")
    return json.loads(line[6:]) if line else []
