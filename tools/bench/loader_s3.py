"""What one training reader fetches from an object store, against plain webdataset over the same rank's share.

    nice python tools/bench/loader_s3.py [--shards 64] [--per-shard 200] [--batch 32] [--ranks 1,8,64]
                                         [--workers 0,2] [--latency-ms 0,20] [--batches 12] [--shuffle-buffer 1000]

Writes img2dataset-layout shards (``key.jpg`` 256 px JPEG, ``key.txt``,
``key.json``), indexes them (``vlcluster index``: ``shards.vlindex``), puts
both on the SeaweedFS test server (``tests/support/s3server.py``) and reads them
through a TCP proxy on 127.0.0.1 that counts requests and bytes and adds a
fixed latency to every request (``tests/support/countingproxy.py``). For rank 0 of
each R and each worker count it measures, without a node cache:

- bytes fetched before the first batch (start-up: index header, member records, first items);
- bytes fetched until the rank's last batch of epoch 0 arrived (prefetched later steps
  included), divided by the bytes the samples it trained on in that epoch take in the
  shards (files, tar headers, padding: ``sample_bytes``); in brackets the same from the
  first batch on (start-up and prefetch depth then cancel: the steady ratio);
- steady samples/s (batches after the first; JPEG decode + resize to 224 px),
  against plain webdataset (``WebDataset(its 1/R of the shards).shuffle(256)``,
  the same decode) over the rank's share, measured in the same run.

With ``--streaming-path DIR`` (where MosaicML Streaming 0.13 is installed apart: see
``tools/bench/streaming_anchor.py``) the table also has Streaming's rows: its own MDS copy of the same
samples (shards of about as many samples) on the same server, rank 0 of R nodes, 0 and 2 workers,
the same decode, its bytes divided by the MDS bytes of the samples it trained on (the copy's mean per
sample: MDS stores no per-sample padding).

Then a 2 -> 3 rank resume mid-epoch (no workers): every sample of the epoch
exactly once over the five readers, and their bytes over the samples they trained on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from tests.support.countingproxy import CountingProxy  # noqa: E402
from tests.support.s3server import S3Server  # noqa: E402
from vlcluster.data import synthetic as syn  # noqa: E402
from vlcluster.data.corpusindex import INDEX_NAME, write_index  # noqa: E402
from vlcluster.data.loader import TrainLoader  # noqa: E402
from vlcluster.data.tarindex import ShardIndex  # noqa: E402
from vlcluster.storage import config  # noqa: E402

STORED, TRAINED = 256, 224  # px


def write_shards(root: Path, shards: int, per_shard: int) -> list[str]:
    """img2dataset's layout: 9-digit keys, jpg + txt + json (url, status, width, height)."""
    generated = syn._samples("train", shards * per_shard, STORED, seed=0, unique=False)
    urls = []
    for shard in range(shards):
        url = str(root / f"{shard:05d}.tar")
        with wds.TarWriter(url, encoder=False) as tar:
            for item in range(per_shard):
                sample = next(generated)
                jpeg = io.BytesIO()
                Image.open(io.BytesIO(sample["png"])).save(jpeg, format="JPEG", quality=90)
                key = f"{shard:05d}{item:04d}"
                meta = {"url": f"http://images.example/{key}.jpg", "status": "success", "width": STORED, "height": STORED, "key": key}
                tar.write({"__key__": key, "jpg": jpeg.getvalue(), "txt": sample["txt"], "json": json.dumps(meta).encode()})
        urls.append(url)
    return urls


def sample_bytes(urls: list[str]) -> dict[str, int]:
    """Bytes every sample takes in its shard, by key: from the end of the previous sample's data to the end of
    its own (its files, their tar headers and padding), so a shard's samples add up to the shard less its end blocks."""
    sizes = {}
    for url in urls:
        index = ShardIndex(url)
        index.close()
        previous = 0
        for sample in index.samples:
            end = -(-max(offset + size for _, offset, size in sample.files) // 512) * 512
            sizes[sample.key], previous = end - previous, end
    return sizes


def to_tensor(image: Image.Image) -> torch.Tensor:
    image = image.convert("RGB").resize((TRAINED, TRAINED), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0)


def use_fsspec_for_s3_in_webdataset() -> None:
    sys.modules["webdataset.gopen"].gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **_: fsspec.open(url, mode).open()


def plain_webdataset(share: list[str], batch: int, batches: int, sizes: dict[str, int], proxy: CountingProxy) -> dict:
    """Plain webdataset over the rank's shards: one pass for the bytes, then a timed pass (the shards repeated
    as often as the timing needs)."""
    proxy.reset()
    keys = [sample["__key__"] for sample in wds.WebDataset(share, shardshuffle=False, empty_check=False)]
    epoch_bytes = proxy.counts()[1]
    repeats = max(1, -(-((batches + 1) * batch) // len(keys)))
    dataset = (
        wds.WebDataset(share * repeats, shardshuffle=False, empty_check=False).shuffle(256).decode("pil")
        .to_tuple("jpg", "txt", "json", "__key__").map(lambda s: (to_tensor(s[0]), s[1], s[3])).batched(batch, collation_fn=None)
    )
    proxy.reset()
    stream = iter(dataset)
    next(stream)
    before_first = proxy.counts()[1]
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        torch.stack([image for image, _, _ in next(stream)])
    rate, cpu_rate = batches * batch / (time.perf_counter() - started), batches * batch / (time.process_time() - cpu)
    return {"first": before_first, "ratio": epoch_bytes / sum(sizes[k] for k in keys), "rate": rate, "cpu_rate": cpu_rate}


def train_loader(urls, rank: int, world: int, batch: int, workers: int, window: int, run: int) -> TrainLoader:
    return TrainLoader(
        urls, rank, world, seed=0, shuffle_buffer=window, batch_size=batch, image_size=TRAINED, num_workers=workers, shuffle_run=run
    )


def vlcluster_reader(urls, world: int, workers: int, run: int, args, sizes: dict[str, int], proxy: CountingProxy) -> dict:
    """Rank 0 of ``world`` over epoch 0 (and on, if the timing needs more batches)."""
    proxy.reset()
    loader = train_loader(urls, 0, world, args.batch, workers, args.shuffle_buffer, run)
    epoch_steps = len(sizes) // (args.batch * world)
    batch = loader.next_batch()
    before_first = proxy.counts()[1]
    first_trained = trained = sum(sizes[k] for k in batch["key"])
    epoch_bytes = None
    started, cpu = time.perf_counter(), time.process_time()
    total = max(epoch_steps, args.batches + 1)
    for step in range(1, total):
        batch = loader.next_batch()
        if step < epoch_steps:
            trained += sum(sizes[k] for k in batch["key"])
        if step == epoch_steps - 1:
            epoch_bytes = proxy.counts()[1]
    rate = (total - 1) * args.batch / (time.perf_counter() - started)
    cpu_rate = (total - 1) * args.batch / (time.process_time() - cpu) if not workers else float("nan")
    loader.close()
    epoch_bytes = epoch_bytes or proxy.counts()[1]
    # After the first batch, readers are as far ahead (prefetch) at the start as at the end: that ratio is the steady one.
    after_first = (epoch_bytes - before_first) / (trained - first_trained) if trained > first_trained else float("nan")
    return {"first": before_first, "ratio": epoch_bytes / trained, "after_first": after_first, "rate": rate, "cpu_rate": cpu_rate,
            "steps": epoch_steps}


def elastic_resume(urls, run: int, args, sizes: dict[str, int], proxy: CountingProxy) -> str:
    """2 ranks for part of epoch 0, then 3 ranks from the saved position to its end: every sample once?"""
    global_batch = 6 * args.batch
    steps = len(sizes) // global_batch
    cut = steps // 2
    proxy.reset()
    seen: list[str] = []
    trained = 0
    two = [train_loader(urls, rank, 2, 3 * args.batch, 0, args.shuffle_buffer, run) for rank in range(2)]
    for _ in range(cut):
        for loader in two:
            keys = loader.next_batch()["key"]
            seen += keys
            trained += sum(sizes[k] for k in keys)
    state = json.loads(json.dumps(two[0].state_dict()))
    for loader in two:
        loader.close()
    three = [train_loader(urls, rank, 3, 2 * args.batch, 0, args.shuffle_buffer, run) for rank in range(3)]
    for loader in three:
        loader.load_state_dict(state)
    for _ in range(steps - cut):
        for loader in three:
            keys = loader.next_batch()["key"]
            seen += keys
            trained += sum(sizes[k] for k in keys)
    for loader in three:
        loader.close()
    fetched = proxy.counts()[1]
    once = len(seen) == len(set(seen)) == steps * global_batch
    return (f"shuffle_run {run}: 2 -> 3 ranks at step {cut} of {steps}: {len(seen)} samples, each once: {once}; "
            f"bytes fetched / bytes trained on, all five readers: {fetched / trained:.2f}")


ANCHOR = Path(__file__).with_name("streaming_anchor.py")


def write_mds_copy(local: list[str], out: Path, per_shard: int, samples: int, streaming_path: str) -> int:
    """Streaming's MDS copy of the shards, its shards sized to hold about ``per_shard`` samples; returns its bytes."""
    payload = 0  # the samples' files, without the tar headers and padding MDS does not store
    for url in local:
        index = ShardIndex(url)
        index.close()
        payload += sum(size for sample in index.samples for _, _, size in sample.files)
    shard_bytes = int(payload / samples * (per_shard + 0.5))
    env = dict(os.environ, PYTHONPATH=streaming_path)
    subprocess.run([sys.executable, str(ANCHOR), "write", *local, "--out", str(out), "--shard-bytes", str(shard_bytes)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return sum(path.stat().st_size for path in out.iterdir())


def streaming_reader(remote: str, world: int, workers: int, args, mds_sample: float, proxy: CountingProxy, env: dict) -> dict:
    """Rank 0 of ``world`` nodes in Streaming; the proxy's counters read at the anchor's two handshakes."""
    proxy.reset()
    command = [sys.executable, str(ANCHOR), "read", remote, "--ranks", str(world), "--workers", str(workers),
               "--batch", str(args.batch), "--batches", str(args.batches), "--image-size", str(TRAINED)]
    marks, result = {}, None
    with subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            if line.strip() in ("first", "epoch"):
                marks[line.strip()] = proxy.counts()[1]
                process.stdin.write("\n")
                process.stdin.flush()
            elif line.startswith("{"):
                result = json.loads(line)
    if result is None:
        raise RuntimeError(f"Streaming's reader failed (exit status {process.returncode}; its traceback is above)")
    trained = result["trained_samples"] * mds_sample
    first_trained = args.batch * mds_sample
    return {"first": marks["first"], "ratio": marks["epoch"] / trained, "rate": result["rate"], "steps": result["steps"],
            "after_first": (marks["epoch"] - marks["first"]) / (trained - first_trained) if trained > first_trained else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ranks", default="1,8,64")
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--latency-ms", default="0,20")
    parser.add_argument("--batches", type=int, default=12, help="timed batches at least (after the first)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--shuffle-runs", default="1,16", help="data.shuffle_run values of the TrainLoader rows")
    parser.add_argument("--streaming-path", help="where mosaicml-streaming 0.13 is installed (pip --target): adds its rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scratch = Path(tempfile.mkdtemp(prefix="vlbench-loader-s3-"))
    try:
        local = write_shards(scratch / "shards", args.shards, args.per_shard) if (scratch / "shards").mkdir() is None else []
        write_index(local, str(scratch / "shards" / INDEX_NAME))
        sizes = sample_bytes(local)
        corpus = sum(os.path.getsize(url) for url in local)
        mds_bytes = write_mds_copy(local, scratch / "mds", args.per_shard, len(sizes), args.streaming_path) if args.streaming_path else 0
        with S3Server(scratch / "s3", buckets=["data"]) as server:
            os.environ.update(server.env)
            config.activate(config.StorageSpec(endpoint_url=server.endpoint))
            fs = fsspec.filesystem("s3")
            fs.put([*local, str(scratch / "shards" / INDEX_NAME)], "s3://data/corpus/")
            urls = [f"s3://data/corpus/{Path(url).name}" for url in local]
            if mds_bytes:
                fs.put(str(scratch / "mds") + "/", "s3://data/mds/", recursive=True)
                mds_shards = len(list((scratch / "mds").glob("*.mds")))
                print(f"Streaming's MDS copy: {mds_shards} shards, {mds_bytes / 2**20:.1f} MB")
            index_bytes = fs.size(f"s3://data/corpus/{INDEX_NAME}")
            use_fsspec_for_s3_in_webdataset()
            print(f"{len(sizes)} samples ({STORED} px JPEG, jpg/txt/json) in {len(urls)} shards, {corpus / 2**20:.1f} MB; "
                  f"index {index_bytes / 1024:.0f} KB; batch {args.batch} per rank; shuffle_buffer {args.shuffle_buffer}; "
                  f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
            print("| latency | R | reader | before 1st batch | epoch bytes / trained bytes (after the 1st batch) | samples/s | vs plain "
                  "| samples per CPU s (this process) | vs plain |")
            print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
            with CountingProxy(int(server.endpoint.rsplit(":", 1)[1])) as proxy:
                config.activate(config.StorageSpec(endpoint_url=proxy.endpoint))
                for latency in (int(x) for x in args.latency_ms.split(",")):
                    proxy.latency_s = latency / 1000
                    for world in (int(x) for x in args.ranks.split(",")):
                        share = urls[0::world]
                        plain = plain_webdataset(share, args.batch, args.batches, sizes, proxy)
                        shard_mb = corpus / len(urls) / 2**20
                        print(f"| {latency} ms | {world} | plain webdataset, its {len(share)} shard(s) | {plain['first'] / 2**20:.2f} MB "
                              f"| {plain['ratio']:.2f} | {plain['rate']:.0f} | 1.00 | {plain['cpu_rate']:.0f} | 1.00 |")
                        for run, workers in ((r, w) for r in map(int, args.shuffle_runs.split(",")) for w in map(int, args.workers.split(","))):
                            ours = vlcluster_reader(urls, world, workers, run, args, sizes, proxy)
                            print(f"| {latency} ms | {world} | TrainLoader, shuffle_run {run}, {workers} workers ({ours['steps']} steps/epoch) | "
                                  f"{ours['first'] / 2**20:.2f} MB ({ours['first'] / (index_bytes + 2 * shard_mb * 2**20):.2f} of index + 2 shards) "
                                  f"| {ours['ratio']:.2f} ({ours['after_first']:.2f}) | {ours['rate']:.0f} | {ours['rate'] / plain['rate']:.2f} "
                                  f"| {ours['cpu_rate']:.0f} | {ours['cpu_rate'] / plain['cpu_rate']:.2f} |", flush=True)
                        for workers in map(int, args.workers.split(",") if mds_bytes else ()):
                            env = dict(os.environ, PYTHONPATH=args.streaming_path, S3_ENDPOINT_URL=proxy.endpoint)
                            theirs = None
                            for attempt in range(3):  # it fails in ~1 of 4 runs at 20 ms (docs/design/data-order.md)
                                try:
                                    theirs = streaming_reader("s3://data/mds", world, workers, args, mds_bytes / len(sizes), proxy, env)
                                    break
                                except RuntimeError as failed:
                                    then = "again" if attempt < 2 else "no row"
                                    print(f"| {latency} ms | {world} | MosaicML Streaming 0.13, {workers} workers: {failed}; {then} |")
                            if theirs is None:
                                continue
                            print(f"| {latency} ms | {world} | MosaicML Streaming 0.13, {workers} workers ({theirs['steps']} steps/epoch) | "
                                  f"{theirs['first'] / 2**20:.2f} MB | {theirs['ratio']:.2f} ({theirs['after_first']:.2f}) | {theirs['rate']:.0f} "
                                  f"| {theirs['rate'] / plain['rate']:.2f} | – | – |", flush=True)
                proxy.latency_s = 0
                for run in map(int, args.shuffle_runs.split(",")):
                    print(elastic_resume(urls, run, args, sizes, proxy))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
