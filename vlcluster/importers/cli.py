"""``vlcluster import FORMAT ... -o DIR``: one sub-command per format of the registry."""

from __future__ import annotations

import argparse
import logging
import sys

from vlcluster.errors import EXIT_OK
from vlcluster.importers.registry import FORMATS, run_import
from vlcluster.stages.imports import ImportStage


def add_import_parser(sub) -> None:
    stage = ImportStage.model_fields  # the import stage's defaults: the command and the stage import alike
    datasets = ", ".join(spec.dataset for spec in FORMATS.values())
    parser = sub.add_parser("import", help=f"import a downstream dataset ({datasets}) as task shards")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, spec in FORMATS.items():
        one = formats.add_parser(name, help=f"{spec.task} data")
        for item in spec.inputs:
            flag = "--" + item.name.replace("_", "-")
            one.add_argument(flag, dest=item.name, required=item.required, help=item.help, action="append" if item.many else "store")
        one.add_argument("-o", "--out", required=True, help="output directory (shards + dataset.json)")
        one.add_argument("--tokenizer", help="tokenizer.json to ship (default: a word-level one built from the texts)")
        one.add_argument("--image-size", type=int, help="resize images (square) while importing")
        one.add_argument("--shard-size", type=int, default=stage["shard_size"].default)
        one.add_argument("--max-answers", type=int, default=stage["max_answers"].default, help="vqa2: answer vocabulary size")
        one.add_argument("--max-bad-fraction", type=float, default=stage["max_bad_fraction"].default)
        one.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from vlcluster.importers.common import ImportFailed, ImportOptions

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    inputs = {i.name: getattr(args, i.name) for i in FORMATS[args.format].inputs if getattr(args, i.name) is not None}
    options = ImportOptions(
        out=args.out, shard_size=args.shard_size, image_size=args.image_size, tokenizer=args.tokenizer,
        max_bad_fraction=args.max_bad_fraction, max_answers=args.max_answers,
    )
    try:
        record = run_import(args.format, inputs, options)
    except ImportFailed as exc:
        raise ValueError(str(exc)) from None  # the CLI's one-paragraph error path
    counts = {split: entry["count"] for split, entry in record["splits"].items()}
    print(f"wrote {args.out}/dataset.json: task {record['task']}, samples {counts}, bad entries {record['bad'] or 'none'}")
    return EXIT_OK
