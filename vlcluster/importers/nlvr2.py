"""NLVR2 from its JSON-lines files and image directories.

Each line: ``{"identifier": "dev-850-0-0", "sentence": ..., "label": "True" | "False",
"left_url", "right_url", ...}``. The pair's images are
``{identifier without its last part}-img0.png`` and ``-img1.png`` (left, right),
found anywhere under the image directory (train images sit in numbered
sub-folders). The split is the identifier's prefix: train, dev (-> val), test1 (-> test).
"""

from __future__ import annotations

import json

from vlcluster.importers.common import BadEntries, DatasetWriter, ImportOptions, image_bytes, index_files, need_dir, need_file

SPLITS = {"train": "train", "dev": "val", "test1": "test", "test2": "test2"}
LABELS = {"True": True, "False": False, "true": True, "false": False}


def _parse(line: str) -> tuple[str, str, str, bool]:
    """(split, image stem, sentence, label) of one line; ValueError when malformed."""
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("not an object")
    identifier, sentence, label = entry.get("identifier"), entry.get("sentence"), entry.get("label")
    if not isinstance(identifier, str) or identifier.count("-") < 3 or not isinstance(sentence, str):
        raise ValueError("no identifier of the form split-set-pair-sentence or no sentence")
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not True/False")
    prefix = identifier.split("-")[0]
    if prefix not in SPLITS:
        raise ValueError(f"identifier prefix {prefix!r} is not one of {sorted(SPLITS)}")
    return SPLITS[prefix], identifier.rsplit("-", 1)[0], sentence, LABELS[label]


def import_nlvr2(options: ImportOptions, jsonl: list[str], images: str) -> dict:
    files = index_files(need_dir(images, "--images"))
    writer = DatasetWriter(options, "nlvr2", "nlvr2")
    bad = BadEntries()
    for path in jsonl:
        for number, line in enumerate(need_file(path, "--jsonl").read_text().splitlines(), start=1):
            if not line.strip():
                continue
            bad.entries += 1
            where = f"{path}:{number}"
            try:
                split, stem, sentence, label = _parse(line)
            except ValueError as exc:
                bad.add("malformed_line", f"{where}: {exc}")
                continue
            names = [f"{stem}-img0.png", f"{stem}-img1.png"]
            if any(name not in files for name in names):
                bad.add("missing_image", f"{where}: {' / '.join(n for n in names if n not in files)}")
                continue
            try:
                encoded = [image_bytes(files[name], options.image_size) for name in names]
            except ValueError as exc:
                bad.add("bad_image", f"{where}: {exc}")
                continue
            sample = {"__key__": f"{split}-{number:08d}-{stem}", "json": json.dumps({"sentence": sentence, "label": label}).encode()}
            for side, (ext, data) in zip(("img0", "img1"), encoded):
                sample[f"{side}.{ext}"] = data
            writer.write(split, sample, [sentence])
    bad.check("nlvr2", options.max_bad_fraction)
    return writer.finish([], bad)
