"""What a training stage's readers fetch from an object store, counted at the job's own scale without its data.

    python tools/bench/loader_at_scale.py [jobs/seed_100k.yaml] [--stage seed] [--items-per-shard 1000]
                                          [--sample-kb 16] [--steps 300]

The job file gives the sources (their shard patterns, expanded but not listed,
and weights), the global batch, the ranks (nodes x GPUs), the workers per rank,
``shuffle_buffer`` and ``shuffle_run`` (``auto`` counts as an object store's) and
the steps. Shard sizes are not known without listing the bucket: every shard is
taken to hold ``--items-per-shard`` items (img2dataset's default) of
``--sample-kb`` each (a 256 px JPEG with its caption and json is 15-25 KB).

The canonical order itself (``data/order.py``) then gives, for ``--steps`` steps
of rank 0 (from the start and from mid-epoch), the shards a rank step opens,
the ranged requests for their member records and for the items' bytes (runs
merged as ``membertable.py`` and ``rangedread.py`` merge them) and the bytes of
each; the index's size comes from the record width of img2dataset's files
(``jpg``/``txt``/``json``, 9-digit keys). The totals multiply by ranks and
steps. ``tools/bench/loader_s3.py`` measures the same quantities on real shards
at a small scale; this script says what they add up to at the job's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vlcluster.data.loader import OBJECT_STORE_RUN  # noqa: E402
from vlcluster.data.membertable import FILE, NEAR_BYTES  # noqa: E402
from vlcluster.data.order import CanonicalOrder, SourceOrder, rank_slices  # noqa: E402
from vlcluster.data.rangedread import MAX_GAP  # noqa: E402
from vlcluster.jobspec.load import load_pipeline  # noqa: E402
from vlcluster.storage import shardlist  # noqa: E402

RECORD = 3 + 9 + FILE.size * 3  # img2dataset: a 9-digit key, jpg + txt + json
HEADER_PER_SHARD = 110  # bytes of a shard's entry in the index header (measured: 108 for img2dataset's shards)


def runs(items: list[int], gap_items: int) -> int:
    """How many ranges ``items`` of one shard take when those at most ``gap_items`` apart are merged."""
    items = sorted(items)
    return 1 + sum(1 for a, b in zip(items, items[1:]) if b - a > gap_items + 1)


def count_steps(order: CanonicalOrder, global_batch: int, ranks: int, steps: int, sample_bytes: int) -> dict[str, float]:
    sizes = [global_batch // ranks + (rank < global_batch % ranks) for rank in range(ranks)]
    offset, size = rank_slices(sizes)[0]
    totals = {"samples": 0, "shards opened": 0, "record requests": 0, "record bytes": 0, "item requests": 0}
    epoch_items = sum(source.epoch_items for source in order.sources)
    for start in (0, epoch_items // 2 // global_batch * global_batch):  # the first steps and mid-epoch
        position = order.skip(order.start, start)
        for _ in range(steps):
            served, _ = order.walk(order.skip(position, offset), size)
            by_shard: dict[tuple[int, int], list[int]] = {}
            for source, at in served:
                _, shard, item = order.sources[source].locate(at)
                by_shard.setdefault((source, shard), []).append(item)
            totals["samples"] += len(served)
            totals["shards opened"] += len(by_shard)
            totals["record requests"] += sum(runs(items, NEAR_BYTES // RECORD) for items in by_shard.values())
            totals["record bytes"] += len(served) * RECORD
            totals["item requests"] += sum(runs(items, MAX_GAP // sample_bytes) for items in by_shard.values())
            position = order.skip(position, global_batch)
    return {key: value / (2 * steps) for key, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", nargs="?", default=str(REPO / "jobs" / "seed_100k.yaml"))
    parser.add_argument("--stage", default=None, help="the stage (default: the first with training shards)")
    parser.add_argument("--items-per-shard", type=int, default=1000)
    parser.add_argument("--sample-kb", type=float, default=16)
    parser.add_argument("--steps", type=int, default=300, help="rank steps counted, from the start and from mid-epoch")
    args = parser.parse_args()
    pipeline = load_pipeline(args.job)
    name = args.stage or next(name for name, stage in pipeline.stages.items() if getattr(stage, "data", None) and stage.data.train)
    stage = pipeline.stages[name]
    data, train, resources = stage.data, stage.train, stage.resources
    sources = [(shardlist.expand(spec.shards, listing=False), spec.weight) for spec in data.train_sources()]
    run = OBJECT_STORE_RUN if data.shuffle_run == "auto" else data.shuffle_run
    orders = [SourceOrder(urls, [args.items_per_shard] * len(urls), 0, data.shuffle_buffer, run) for urls, _ in sources]
    order = CanonicalOrder(orders, [weight for _, weight in sources], 0, data.shuffle_buffer, run=run)
    ranks = resources.nodes * resources.gpus_per_node
    sample_bytes = int(args.sample_kb * 1024)
    per_step = count_steps(order, train.batch_size, ranks, args.steps, sample_bytes)
    shards = sum(len(urls) for urls, _ in sources)
    workers = data.num_workers if isinstance(data.num_workers, int) else 0
    run_steps = train.steps
    print(f"{args.job}, stage {name}: {len(sources)} source(s), {shards} shards of {args.items_per_shard} items of {args.sample_kb:g} KB "
          f"(assumed); {ranks} ranks x {workers} workers; batch {train.batch_size} ({per_step['samples']:.1f} a rank); "
          f"shuffle_buffer {data.shuffle_buffer}, shuffle_run {run}; {train.steps} steps")
    samples_bytes = per_step["samples"] * sample_bytes
    record_share = per_step["record bytes"] / samples_bytes
    requests = per_step["record requests"] + per_step["item requests"]
    print("| per rank step | count | bytes |\n|---|---:|---:|")
    print(f"| samples | {per_step['samples']:.1f} | {samples_bytes / 1024:.0f} KB |")
    print(f"| shards opened | {per_step['shards opened']:.2f} | |")
    print(f"| member-record requests | {per_step['record requests']:.2f} | {per_step['record bytes'] / 1024:.2f} KB ({record_share:.1%} of the samples') |")
    print(f"| item requests | {per_step['item requests']:.2f} | {samples_bytes / 1024:.0f} KB |")
    index_bytes = shards * (HEADER_PER_SHARD + args.items_per_shard * RECORD)
    total_requests = requests * ranks * run_steps
    print(f"index: {index_bytes / 1e9:.2f} GB written once ({shards * HEADER_PER_SHARD / 1e6:.1f} MB header, read by each of the "
          f"{ranks} ranks at start-up: {ranks * shards * HEADER_PER_SHARD / 1e9:.2f} GB in all)")
    print(f"the run: {total_requests / 1e6:.1f} M ranged GET requests ({requests / per_step['samples']:.2f} a sample), "
          f"{ranks * run_steps * samples_bytes * (1 + record_share) / 1e12:.2f} TB fetched for "
          f"{ranks * run_steps * samples_bytes / 1e12:.2f} TB of samples trained on; plain webdataset reading whole shards: "
          f"{ranks * run_steps * per_step['samples'] / args.items_per_shard / 1e6:.2f} M requests")


if __name__ == "__main__":
    main()
