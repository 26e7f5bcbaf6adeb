"""A private one-node Ray cluster for one run (``submit --backend ray``
without ``--address``), also used by the tests.

``ray start --head --block`` stays in the foreground as the parent of the
node's processes and stops exactly those on SIGTERM, so the cluster is
stopped by one pid. ``ray stop`` is never used: it kills every Ray process
of the machine by name, other users' clusters included.

Everything binds to 127.0.0.1 on ports picked free here (two runs, or a run
and a test cluster, can share a machine), and the session lives under a
short ``/tmp/ray-*`` directory: Ray's AF_UNIX socket paths must stay under
108 bytes, which a deep temp dir would exceed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vlcluster.backends.stage_process import die_with_parent
from vlcluster.ports import free_ports

START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30
# Ray ports with fixed defaults (6379, 8265, 10001, 52365, ...): each gets a free one.
NODE_PORT_FLAGS = (
    "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
    "--metrics-export-port", "--node-manager-port", "--object-manager-port",
)
HEAD_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", *NODE_PORT_FLAGS)




def dashboard_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
            return response.status == 200 and "ray_version" in json.loads(response.read())
    except (OSError, ValueError):
        return False


def ray_start() -> list[str]:
    """``ray start`` of this Python's environment, in the foreground, on loopback."""
    ray = Path(sys.executable).with_name("ray")
    return [str(ray) if ray.exists() else "ray", "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]


class LocalRayCluster:
    """``with LocalRayCluster(num_cpus=4) as cluster: cluster.dashboard_url``;
    ``add_node`` joins more nodes on this host (multi-node stages in tests)."""

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None, log: Path | None = None):
        self.num_cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
        self.num_gpus = num_gpus
        self.log = log
        self.process: subprocess.Popen | None = None
        self.nodes: list[subprocess.Popen] = []
        self.temp_dir: str | None = None
        self.ports: dict[str, int] = {}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['--port']}"

    def command(self) -> list[str]:
        command = [
            *ray_start(), "--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}",
        ]
        if self.num_gpus is not None:
            command.append(f"--num-gpus={self.num_gpus}")
        return command + [f"{flag}={port}" for flag, port in self.ports.items()]

    def spawn(self, command: list[str]) -> subprocess.Popen:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)  # inside another Ray job this would point the new node at that cluster
        out = open(self.log, "a") if self.log else subprocess.DEVNULL
        # Its own session (a Ctrl-C of the submit reaches the cluster only through
        # stop()), but SIGTERMed when its parent dies: a killed submit takes its cluster along.
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent)

    def alive_nodes(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes?detail=false", timeout=5) as response:
                nodes = json.loads(response.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(node.get("state") == "ALIVE" for node in nodes)

    def add_node(self, num_cpus: int) -> None:
        """Another node on this host, joined to the head; returns once Ray lists it."""
        expected = self.alive_nodes() + 1
        ports = dict(zip(NODE_PORT_FLAGS, free_ports(len(NODE_PORT_FLAGS))))
        node = self.spawn([*ray_start(), f"--address={self.gcs_address}", f"--num-cpus={num_cpus}",
                           *(f"{flag}={port}" for flag, port in ports.items())])
        self.nodes.append(node)
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.alive_nodes() < expected:
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray node did not join (ray start exit {node.returncode}); log: {self.log}")
            time.sleep(0.3)

    def start(self) -> LocalRayCluster:
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.ports = dict(zip(HEAD_PORT_FLAGS, free_ports(len(HEAD_PORT_FLAGS))))
        self.process = self.spawn(self.command())
        deadline = time.monotonic() + START_TIMEOUT_S
        while not dashboard_answers(self.dashboard_url) or self.alive_nodes() < 1:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"local Ray head did not come up (ray start exit {self.process.returncode}); log: {self.log}")
            time.sleep(0.3)
        return self

    def stop(self) -> None:
        for process in [*reversed(self.nodes), self.process]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
                try:
                    process.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
