"""ImageNet-style class folders: ``<root>/<split>/<class>/<image>``.

Splits are the sub-folders named train and val (``<root>/<class>/...`` alone is one train
split). Class order: the optional class-index file, either Keras' ImageNet JSON
(``{"0": ["n01440764", "tench"], ...}``) or a text file with one folder name per line;
without one, folder names sorted. Class names are the index's human-readable names when
it has them. Images of folders the index does not list are counted as ``unknown_class``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlcluster.importers.common import BadEntries, DatasetWriter, ImportFailed, ImportOptions, image_bytes, need_dir, need_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".JPEG", ".JPG", ".PNG"}
SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val"}


def read_class_index(path: Path) -> tuple[list[str], list[str]]:
    """(folder names, display names) in class-index order."""
    text = path.read_text()
    if path.suffix == ".json":
        try:
            payload = json.loads(text)
            ordered = [payload[str(i)] for i in range(len(payload))]
            return [str(entry[0]) for entry in ordered], [str(entry[1]) for entry in ordered]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ImportFailed(f"{path}: expected {{\"0\": [folder, name], ...}} ({type(exc).__name__}: {exc})") from None
    folders = [line.strip() for line in text.splitlines() if line.strip()]
    return folders, folders


def import_imagefolder(options: ImportOptions, root: str, class_index: str | None = None) -> dict:
    base = need_dir(root, "--root")
    split_dirs = {SPLIT_DIRS[p.name]: p for p in sorted(base.iterdir()) if p.is_dir() and p.name in SPLIT_DIRS}
    if not split_dirs:
        split_dirs = {"train": base}
    if class_index:
        folders, names = read_class_index(need_file(class_index, "--class-index"))
    else:
        folders = sorted({c.name for d in split_dirs.values() for c in d.iterdir() if c.is_dir()})
        names = folders
    if not folders:
        raise ImportFailed(f"{base}: no class folders found")
    label_of = {folder: index for index, folder in enumerate(folders)}
    writer = DatasetWriter(options, "classification", "imagefolder")
    bad = BadEntries()
    for split, directory in split_dirs.items():
        for class_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
            for image in sorted(p for p in class_dir.iterdir() if p.suffix in IMAGE_SUFFIXES):
                bad.entries += 1
                if class_dir.name not in label_of:
                    bad.add("unknown_class", f"{image}")
                    continue
                try:
                    ext, data = image_bytes(image, options.image_size)
                except ValueError as exc:
                    bad.add("bad_image", f"{image}: {exc}")
                    continue
                key = f"{split}-{class_dir.name}-{image.stem}".replace(".", "_")
                writer.write(split, {"__key__": key, ext: data, "cls": str(label_of[class_dir.name]).encode()})
    bad.check("imagefolder", options.max_bad_fraction)
    return writer.finish(names, bad)
