"""MosaicML Streaming over the same samples, for tools/bench/loader_s3.py's table (the anchor that already
resumes exactly on another topology). Runs in its own process, started by that bench:

    python tools/bench/streaming_anchor.py write SHARD.tar... --out MDS_DIR --shard-bytes N
    python tools/bench/streaming_anchor.py read s3://bucket/mds --ranks R --workers W --batch B --batches N

``mosaicml-streaming`` 0.13 pins ``numpy<2.2`` and its package imports torchvision (for its vision
datasets), which does not import beside the CPU torch wheel this project uses. Neither matters for
``StreamingDataset`` over ``bytes``/``str``/``json`` columns, so the bench installs it apart from the
project's environment and puts it on ``PYTHONPATH`` (``--streaming-path``)::

    pip install --no-deps --target /tmp/streaming-pkgs mosaicml-streaming==0.13.0 boto3 s3transfer \\
        catalogue brotli python-snappy cramjam zstd

and this process stands empty modules in for Streaming's vision, text and multimodal subpackages.

``read`` is rank 0 of R ranks on R nodes (``RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE`` as a launcher
sets them; ``num_canonical_nodes`` R), shuffled (py1e, its default blocks), batch B per rank, the same
JPEG decode and resize as the other rows. It says ``first`` after the first batch and ``epoch`` after the
last batch of its epoch and waits for a line on stdin each time, so the parent reads its byte counters
at exactly those points; then prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import types


def import_streaming():
    for name in ("streaming.vision", "streaming.text", "streaming.multimodal"):
        sys.modules.setdefault(name, types.ModuleType(name))  # their torchvision imports are all they would add
    import streaming

    return streaming


def write(args: argparse.Namespace) -> None:
    import webdataset as wds

    streaming = import_streaming()
    columns = {"jpg": "bytes", "txt": "str", "json": "json"}
    count = 0
    with streaming.MDSWriter(out=args.out, columns=columns, size_limit=args.shard_bytes) as writer:
        for sample in wds.WebDataset(args.shards, shardshuffle=False, empty_check=False):
            writer.write({"jpg": sample["jpg"], "txt": sample["txt"].decode(), "json": json.loads(sample["json"])})
            count += 1
    print(json.dumps({"samples": count}))


def handshake(word: str) -> None:
    print(word, flush=True)
    sys.stdin.readline()


def read(args: argparse.Namespace) -> None:
    os.environ.update(RANK="0", WORLD_SIZE=str(args.ranks), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import torch

    streaming = import_streaming()
    # Rank 0 reads alone (the other ranks' processes are not started): nothing of its reading crosses ranks but
    # the barrier around the index download, which Streaming skips when it did not start torch.distributed itself.
    for module in ("streaming.base.dataset", "streaming.base.util"):
        sys.modules[module].maybe_init_dist = lambda: False
    # Shared memory an earlier run left (its resource tracker removes it late) would be taken for this run's.
    sys.modules["streaming.base.util"].clean_stale_shared_memory()
    torch.set_num_threads(1)
    local = tempfile.mkdtemp(prefix="vlbench-streaming-")
    try:
        measure(args, streaming, local)
    finally:
        shutil.rmtree(local, ignore_errors=True)  # the shards it downloaded


def measure(args: argparse.Namespace, streaming, local: str) -> None:
    import io

    import numpy as np
    import torch
    from PIL import Image

    dataset = streaming.StreamingDataset(
        remote=args.remote, local=local, shuffle=True, num_canonical_nodes=args.ranks, batch_size=args.batch, shuffle_seed=0
    )

    def decode(sample):
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((args.image_size,) * 2, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1), sample["txt"]

    def collate(samples):
        return torch.stack([decode(s)[0] for s in samples])

    loader = streaming.StreamingDataLoader(dataset, batch_size=args.batch, num_workers=args.workers, collate_fn=collate,
                                           drop_last=True, persistent_workers=args.workers > 0)
    epoch_steps = len(loader)
    total = max(epoch_steps, args.batches + 1)
    step, started, trained = 0, None, 0
    while step < total:
        for batch in loader:
            step += 1
            if step <= epoch_steps:
                trained += len(batch)
            if step == 1:
                handshake("first")
                started = time.perf_counter()
            if step == epoch_steps:
                handshake("epoch")
            if step == total:
                break
    rate = (total - 1) * args.batch / (time.perf_counter() - started)
    print(json.dumps({"steps": epoch_steps, "trained_samples": trained, "rate": rate}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("write")
    writer.add_argument("shards", nargs="+")
    writer.add_argument("--out", required=True)
    writer.add_argument("--shard-bytes", type=int, required=True)
    reader = commands.add_parser("read")
    reader.add_argument("remote")
    reader.add_argument("--ranks", type=int, required=True)
    reader.add_argument("--workers", type=int, default=0)
    reader.add_argument("--batch", type=int, default=32)
    reader.add_argument("--batches", type=int, default=12)
    reader.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    {"write": write, "read": read}[args.command](args)


if __name__ == "__main__":
    main()
