"""A real Ray cluster on this machine, as `ray start` builds one: a head with its job server, more nodes on demand.

Each node is one `ray start --block` process in a process group of its own, so a test stops (or kills)
exactly what it started; `ray stop` would stop every Ray instance on the machine, other tests' too. Every
port is a free one and the cluster has a temp folder of its own, so a plain `ray.init()` elsewhere never
finds it. Token authentication is on, as on a real cluster, with a token of this cluster's only (never
~/.ray/auth_token): every process the cluster or a test starts gets it through `env`.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent  # this environment's `ray` and `dist-minbert`, as an activated venv has them
# Another cluster's settings must not leak into ours (the test session's own ray.init sets RAY_AUTH_MODE).
FOREIGN = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# A node that is killed is declared dead after 3 missed checks of 0.5 s, not Ray's default 5 of 3 s.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3",
                   "RAY_health_check_initial_delay_ms": "0"}


def free_ports(count: int) -> list[int]:
    """`count` distinct ports the kernel had free a moment ago."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def client_env(token: str, **extra: str) -> dict[str, str]:
    """The environment of a process that talks to the cluster: its token, this venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_DISABLE_USAGE_STATS="1", **extra)
    return env


class RayCluster:
    def __init__(self, temp_dir: Path, env: dict[str, str]):
        self.temp_dir, self.env = temp_dir, env
        self.nodes: dict[str, subprocess.Popen] = {}
        self.gcs_address = self.dashboard_url = ""

    def _start(self, name: str, num_cpus: int, options: list[str]) -> None:
        agent, grpc, runtime_env, metrics, manager, objects = free_ports(6)
        log = open(self.temp_dir / f"{name}.log", "wb")
        self.nodes[name] = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
             f"--resources={json.dumps({name: 1})}", "--node-ip-address=127.0.0.1",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             f"--node-manager-port={manager}", f"--object-manager-port={objects}",
             "--object-store-memory=100000000", "--disable-usage-stats", *options],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start_head(self, num_cpus: int) -> None:
        gcs, dashboard, client = free_ports(3)
        # Every process of the cluster and of its clients names it: Ray Train's placement-group cleaner looks
        # for "the" cluster otherwise, and fails when this machine runs more than one (the test session's own).
        self.env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"
        self._start("head", num_cpus, ["--head", f"--port={gcs}", "--include-dashboard=true",
                                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                       f"--ray-client-server-port={client}", f"--temp-dir={self.temp_dir}"])
        self.gcs_address, self.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
        self.wait_for_nodes()

    def add_node(self, name: str, num_cpus: int) -> None:
        self._start(name, num_cpus, [f"--address={self.gcs_address}"])
        self.wait_for_nodes()

    def kill_node(self, name: str) -> None:
        """SIGKILL to the node's whole process group: its raylet, object store, agents and workers at once."""
        node = self.nodes.pop(name)
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        """The `ray` CLI as a user runs it, by default with the cluster's token."""
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def alive_nodes(self) -> list[dict]:
        """`ray list nodes` of this cluster: node_id, node_name, is_head_node, resources_total, state."""
        out = self.ray("list", "nodes", "--address", self.dashboard_url, "--format", "json", "--detail",
                       "--filter", "state=ALIVE").stdout
        return json.loads(out)

    def node_ids(self) -> dict[str, str]:
        """name → node id of each live node (a node's name is its one custom resource)."""
        return {name: node["node_id"] for node in self.alive_nodes() for name in node["resources_total"]
                if name in self.nodes}

    def wait_for_nodes(self, timeout: float = 90) -> None:
        """Until exactly the nodes started and not killed are alive (a killed one is declared dead in ~2 s)."""
        deadline = time.monotonic() + timeout
        while True:
            for name, node in self.nodes.items():
                if node.poll() is not None:
                    log = (self.temp_dir / f"{name}.log").read_text(errors="replace")
                    raise RuntimeError(f"ray start of node {name} exited with {node.returncode}:\n{log[-3000:]}")
            try:
                alive = self.alive_nodes()
                names = {name for node in alive for name in node["resources_total"] if name in self.nodes}
                if len(alive) == len(self.nodes) and names == self.nodes.keys():
                    return
            except (subprocess.CalledProcessError, json.JSONDecodeError):
                pass  # the dashboard is not up yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {sorted(self.nodes)} were not all alive, alone, within {timeout} s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Other nodes first (they wait on the head otherwise), then the head: SIGTERM to `ray start`, which stops
        its processes, then SIGKILL to its group for whatever it left (the dashboard's module processes)."""
        for name in sorted(self.nodes, key=lambda n: n == "head"):
            node = self.nodes.pop(name)
            node.terminate()
            try:
                node.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            with _gone_ok():
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()


@contextmanager
def _gone_ok() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


@contextmanager
def ray_cluster(head_cpus: int, **env: str) -> Iterator[RayCluster]:
    """A running head (dashboard and job server on) with `head_cpus` CPUs; stopped on exit."""
    # Short and under /tmp: Ray's Unix sockets live in it, and a socket path is limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayt-", dir="/tmp"))
    cluster = RayCluster(temp_dir, client_env(secrets.token_hex(16), **FAST_NODE_DEATH, **env))
    try:
        cluster.start_head(head_cpus)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
