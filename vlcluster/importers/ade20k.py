"""ADE20k scene parsing (the ADEChallengeData2016 layout).

``<root>/images/{training,validation}/ADE_*.jpg`` with masks
``<root>/annotations/{training,validation}/ADE_*.png`` (one channel, 0 = ignore / other,
1..150 = the classes). Class names come from ``objectInfo150.csv`` (``Idx,Ratio,Train,Val,Name``)
when present beside the folders, else ``class_<i>``. An image without its mask is counted
as ``missing_annotation``; a mask of another size or with labels above 150, as ``bad_mask``.
"""

from __future__ import annotations

import csv
import io

import numpy as np
from PIL import Image

from vlcluster.importers.common import BadEntries, DatasetWriter, ImportOptions, image_bytes, need_dir

CLASSES = 150
SPLITS = {"training": "train", "validation": "val"}


def class_names(root) -> list[str]:
    info = root / "objectInfo150.csv"
    if info.is_file():
        with open(info, newline="") as handle:
            rows = list(csv.DictReader(handle))
        names = [row.get("Name", "").split(";")[0].strip() for row in rows]
        if len(names) == CLASSES and all(names):
            return names
    return [f"class_{i}" for i in range(1, CLASSES + 1)]


def import_ade20k(options: ImportOptions, root: str) -> dict:
    base = need_dir(root, "--root")
    need_dir(base / "images", "--root (images/)")
    writer = DatasetWriter(options, "segmentation", "ade20k")
    bad = BadEntries()
    for folder, split in SPLITS.items():
        image_dir = base / "images" / folder
        if not image_dir.is_dir():
            continue
        for image in sorted(image_dir.glob("*.jpg")):
            bad.entries += 1
            mask = base / "annotations" / folder / f"{image.stem}.png"
            if not mask.is_file():
                bad.add("missing_annotation", f"{image}")
                continue
            try:
                ext, data = image_bytes(image, options.image_size)
                _, mask_data = image_bytes(mask, options.image_size, mask=True)
            except ValueError as exc:
                bad.add("bad_image", f"{image}: {exc}")
                continue
            problem = _mask_problem(mask_data, data)
            if problem:
                bad.add("bad_mask", f"{mask}: {problem}")
                continue
            writer.write(split, {"__key__": f"{split}-{image.stem}", ext: data, "seg.png": mask_data})
    bad.check("ade20k", options.max_bad_fraction)
    return writer.finish(class_names(base), bad)


def _mask_problem(mask_data: bytes, image_data: bytes) -> str | None:
    mask = Image.open(io.BytesIO(mask_data))
    size = Image.open(io.BytesIO(image_data)).size
    if mask.size != size:
        return f"mask {mask.size} vs image {size}"
    top = int(np.asarray(mask).max(initial=0))
    return f"label {top} > {CLASSES}" if top > CLASSES else None
