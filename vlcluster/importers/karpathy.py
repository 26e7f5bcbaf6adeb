"""COCO / Flickr30k retrieval from Karpathy's split files (dataset_coco.json, dataset_flickr30k.json).

``{"images": [{"filepath": "val2014" (COCO only), "filename", "split": "train" | "restval"
| "val" | "test", "sentences": [{"raw", "tokens", ...}, ...], "imgid", ...}], "dataset": ...}``.
Images are looked up as ``<images>/<filepath>/<filename>``, else by file name anywhere
under ``<images>``. ``restval`` joins ``train`` (the usual 113k COCO training images).
A sample is the image plus its captions, one per line of ``txt``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlcluster.importers.common import BadEntries, DatasetWriter, ImportFailed, ImportOptions, image_bytes, index_files, need_dir, need_file

SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def import_karpathy(options: ImportOptions, split_json: str, images: str) -> dict:
    path = need_file(split_json, "--split-json")
    root = need_dir(images, "--images")
    try:
        payload = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportFailed(f"{path}: not JSON ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise ImportFailed(f"{path}: expected an object with an 'images' list (Karpathy's split file)")
    files = None
    writer = DatasetWriter(options, "retrieval", f"karpathy-{payload.get('dataset', 'unknown')}")
    bad = BadEntries()
    for entry in payload["images"]:
        bad.entries += 1
        try:
            filename, split = str(entry["filename"]), SPLITS[entry["split"]]
            captions = [" ".join(str(s["raw"]).split()) for s in entry["sentences"]]
        except (KeyError, TypeError):
            bad.add("malformed_entry", f"{path}: {str(entry)[:120]}")
            continue
        captions = [c for c in captions if c]
        if not captions:
            bad.add("no_caption", f"{path}: {filename}")
            continue
        folder = str(entry.get("filepath", ""))
        if Path(filename).name != filename or ".." in Path(folder).parts or Path(folder).is_absolute():
            bad.add("malformed_entry", f"{path}: file {folder}/{filename} is not inside the image directory")
            continue
        image_path = root / folder / filename
        if not image_path.is_file():
            files = files if files is not None else index_files(root)
            if filename not in files:
                bad.add("missing_image", f"{filename} (split {entry['split']})")
                continue
            image_path = files[filename]
        try:
            ext, data = image_bytes(image_path, options.image_size)
        except ValueError as exc:
            bad.add("bad_image", f"{image_path}: {exc}")
            continue
        key = f"{split}-{Path(filename).stem}".replace(".", "_")
        writer.write(split, {"__key__": key, ext: data, "txt": "\n".join(captions).encode()}, captions)
    bad.check("karpathy", options.max_bad_fraction)
    return writer.finish([], bad)
