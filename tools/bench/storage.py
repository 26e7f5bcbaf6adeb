#!/usr/bin/env python3
"""Object storage against the local disk, on a real S3-compatible server
(SeaweedFS on 127.0.0.1, started here; `pip install -e '.[test]'`).

1. `vlcluster submit jobs/quickstart.yaml` with the SMALL overrides of
   tests/e2e/test_e2e.py: run directory (and so the data stage's shards) on a
   local disk (baseline) and on s3://.
2. Reading every shard of a dataset twice ("two epochs") from s3:// without
   and with `storage.cache_dir`: GetObject requests, bytes downloaded and
   wall time per epoch, against reading the same shards from the local disk.

    .venv/bin/python tools/bench/storage.py [--skip-quickstart] [--n-train 8000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support.jobs import QUICKSTART, SMALL  # noqa: E402
from tests.support.s3server import S3Server  # noqa: E402


def quickstart(run_dir: str, env: dict[str, str], extra: list[str]) -> float:
    args = [sys.executable, "-m", "vlcluster.cli", "submit", QUICKSTART, "--run-dir", run_dir]
    for override in [*SMALL, *extra]:
        args += ["--set", override]
    started = time.perf_counter()
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode:
        raise RuntimeError(f"quickstart on {run_dir} failed:\n{result.stdout[-5000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def bench_quickstart(server: S3Server, scratch: Path) -> None:
    env = {**os.environ, **server.env}
    local = quickstart(str(scratch / "local-run"), env, [])
    remote = quickstart("s3://runs/bench-quickstart", env, [f"storage.endpoint_url={server.endpoint}", f"storage.cache_dir={scratch / 'cache'}"])
    print(f"quickstart SMALL, local run dir (baseline): {local:6.1f} s  (1.00x)")
    print(f"quickstart SMALL, shards + run dir on s3:   {remote:6.1f} s  ({remote / local:.2f}x)")


def read_epoch(urls: list[str]) -> tuple[float, int]:
    from vlcluster.storage.shardlist import open_input as open_url

    started, total = time.perf_counter(), 0
    for url in urls:
        with open_url(url) as stream:
            total += len(stream.read())
    return time.perf_counter() - started, total


def bench_cache(server: S3Server, scratch: Path, n_train: int) -> None:
    import fsspec

    from vlcluster.storage.shardlist import expand as expand_urls
    from vlcluster.storage import config

    os.environ.update(server.env)
    config.activate(config.StorageSpec(endpoint_url=server.endpoint))
    from vlcluster.data.synthetic import write_split

    write_split("s3://data/bench", "train", n_train, 500, 64, seed=0)
    write_split(str(scratch / "disk"), "train", n_train, 500, 64, seed=0)
    disk_urls = sorted(str(p) for p in (scratch / "disk").glob("train-*.tar"))
    disk = min(read_epoch(disk_urls)[0] for _ in range(3))
    print(f"\n{len(disk_urls)} shards of 500 64px samples, {n_train} samples")
    print(f"local disk, warm page cache (baseline):  {disk:6.3f} s per epoch (1.00x)")
    for cache in (None, scratch / "shard-cache"):
        config.activate(config.StorageSpec(endpoint_url=server.endpoint, cache_dir=str(cache) if cache else None))
        fs = fsspec.filesystem("s3")
        fs.connect()
        counts = {"requests": 0, "bytes": 0}

        def after_get(parsed, **_):
            counts["requests"] += 1
            counts["bytes"] += int(parsed.get("ContentLength") or 0)

        fs.s3.meta.events.register("after-call.s3.GetObject", after_get)
        urls = expand_urls("s3://data/bench/train-*.tar")
        label = "s3, cache_dir set" if cache else "s3, no cache"
        for epoch in (1, 2):
            before = dict(counts)
            seconds, size = read_epoch(urls)
            got = {key: counts[key] - before[key] for key in counts}
            print(f"{label:18s} epoch {epoch}: {seconds:6.3f} s ({seconds / disk:5.2f}x), "
                  f"{got['requests']:3d} GetObject, {got['bytes'] / 2**20:6.2f} MiB downloaded of {size / 2**20:.2f} MiB read")
        fs.s3.meta.events.unregister("after-call.s3.GetObject", after_get)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--n-train", type=int, default=8000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, S3Server(Path(tmp) / "s3", buckets=["data", "runs"]) as server:
        scratch = Path(tmp)
        if not args.skip_quickstart:
            bench_quickstart(server, scratch)
        bench_cache(server, scratch, args.n_train)


if __name__ == "__main__":
    main()
