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
