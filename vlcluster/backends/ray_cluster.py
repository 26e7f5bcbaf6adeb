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
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30
# Ray ports with fixed defaults (6379, 8265, 10001, 52365, ...): each gets a free one.
PORT_FLAGS = (
    "--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
    "--node-manager-port", "--object-manager-port",
)


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def dashboard_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
            return response.status == 200 and "ray_version" in json.loads(response.read())
    except (OSError, ValueError):
        return False


class LocalRayCluster:
    """``with LocalRayCluster(num_cpus=4) as cluster: cluster.dashboard_url``"""

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None, log: Path | None = None):
        self.num_cpus = num_cpus if num_cpus is not None else os.cpu_count() or 1
        self.num_gpus = num_gpus
        self.log = log
        self.process: subprocess.Popen | None = None
        self.temp_dir: str | None = None
        self.ports: dict[str, int] = {}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['--port']}"

    def command(self) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        command = [
            ray if os.path.exists(ray) else "ray", "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}",
        ]
        if self.num_gpus is not None:
            command.append(f"--num-gpus={self.num_gpus}")
        return command + [f"{flag}={port}" for flag, port in self.ports.items()]

    def start(self) -> LocalRayCluster:
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)  # inside another Ray job this would point the new head at that cluster
        out = open(self.log, "a") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not dashboard_answers(self.dashboard_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"local Ray head did not come up (ray start exit {self.process.returncode}); log: {self.log}")
            time.sleep(0.3)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
