"""A small run of tools/bench/loader_s3.py's measurements (the bench itself is a tool, not a test)."""

from __future__ import annotations

import argparse
from pathlib import Path

import fsspec

from tests.support.countingproxy import CountingProxy
from tools.bench import loader_s3 as bench
from vlcluster.data.corpusindex import INDEX_NAME, write_index
from vlcluster.storage import config


def test_bench_measures_bytes_and_the_resume_on_a_tiny_corpus(s3_env, s3_server, tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    local = bench.write_shards(tmp_path / "shards", 4, 12)
    write_index(local, str(tmp_path / "shards" / INDEX_NAME))
    sizes = bench.sample_bytes(local)
    left = sum(Path(url).stat().st_size for url in local) - sum(sizes.values())
    assert 4 * 1024 <= left <= 4 * 10240  # spans tile the shards but for end blocks and record padding
    config.activate(config.StorageSpec(endpoint_url=s3_env.endpoint_url))
    fsspec.filesystem("s3").put([*local, str(tmp_path / "shards" / INDEX_NAME)], "s3://data/bench/")
    urls = [f"s3://data/bench/{Path(url).name}" for url in local]
    bench.use_fsspec_for_s3_in_webdataset()
    args = argparse.Namespace(batch=4, batches=2, shuffle_buffer=16)
    with CountingProxy(int(s3_server.endpoint.rsplit(":", 1)[1])) as proxy:
        config.activate(config.StorageSpec(endpoint_url=proxy.endpoint))
        fsspec.filesystem("s3").clear_instance_cache()
        plain = bench.plain_webdataset(urls[0::2], 4, 2, sizes, proxy)
        ours = bench.vlcluster_reader(urls, 2, 0, 4, args, sizes, proxy)
        resume = bench.elastic_resume(urls, 4, argparse.Namespace(batch=2, shuffle_buffer=16), sizes, proxy)
    assert 1.0 <= plain["ratio"] < 1.1 and plain["rate"] > 0  # a whole-shard stream: its tar and HTTP overhead
    assert ours["steps"] == 6 and 0 < ours["first"] and 1.0 < ours["ratio"] < 3 and ours["rate"] > 0
    assert "each once: True" in resume


def test_the_at_scale_count_of_seed_100k_runs_and_adds_up() -> None:
    """tools/bench/loader_at_scale.py on the shipped job: its counts come from the canonical order itself."""
    import re
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "tools/bench/loader_at_scale.py", "jobs/seed_100k.yaml", "--steps", "20"],
                          capture_output=True, text=True, cwd=repo, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "9460 shards" in done.stdout and "48 ranks x 8 workers" in done.stdout and "shuffle_run 16" in done.stdout
    samples = float(re.search(r"\| samples \| ([\d.]+) \|", done.stdout).group(1))
    opened = float(re.search(r"\| shards opened \| ([\d.]+) \|", done.stdout).group(1))
    assert 21 <= samples <= 22  # 1,024 over 48 ranks
    assert 1 <= opened <= 6  # runs of 16 from four sources: a rank step opens a few shards, not one per sample
    requests = float(re.search(r"\(([\d.]+) a sample\)", done.stdout).group(1))
    assert 0.1 < requests < 1
