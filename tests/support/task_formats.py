"""Tiny datasets in the exact on-disk formats of the paper's downstream datasets, written
from the formats' specifications (VQA v2, Karpathy splits, NLVR2, ImageFolder, ADE20k).

Each writer plants a few bad entries and returns what a correct import must report.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, size: int = 40, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def write_vqa2(root: Path) -> dict:
    """train2014 + val2014 question/annotation files and COCO-named images."""
    images = root / "coco"
    answers_by_question = {}
    files = {}
    for subtype, image_ids in (("train2014", [9, 25, 30]), ("val2014", [42, 73])):
        for image_id in image_ids:
            if image_id != 30:  # image 30 is missing: its questions are bad entries
                write_image(images / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", image_id)
        questions, annotations = [], []
        for n, image_id in enumerate(image_ids):
            for k in range(2):
                qid = image_id * 1000 + k
                # 10 annotators, typed as people type: "yes" x6, "no" x3, "2" x1 (or a rare
                # answer for one question); the official normalisation makes them one answer each.
                given = ["yes", "Yes", "yes.", "YES", "yes!", " yes"] + ["no"] * 3 + ["Two."] if k == 0 else \
                    ["red", "Red."] + ["blue"] * 5 + ["the blue", "Blue", "blue "]
                if (subtype, image_id, k) == ("train2014", 25, 1):
                    given = [a for a in ("lion", "tiger", "bear", "wolf", "fox") for _ in range(2)]  # all rare
                questions.append({"image_id": image_id, "question": f"what is shown {k}?", "question_id": qid})
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": "other",
                    "multiple_choice_answer": max(set(given), key=given.count),
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(given)],
                })
                answers_by_question[qid] = given
        questions.append({"image_id": 9, "question_id": 999999})  # malformed: no question text
        files[subtype] = (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json", root / f"v2_mscoco_{subtype}_annotations.json")
        header = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": subtype}
        files[subtype][0].write_text(json.dumps({**header, "task_type": "Open-Ended", "questions": questions}))
        files[subtype][1].write_text(json.dumps({**header, "annotations": annotations}))
    return {"images": images, "files": files, "answers": answers_by_question}


def write_karpathy(root: Path, coco: bool = True) -> dict:
    images = root / ("coco" if coco else "flickr30k-images")
    entries = []
    for imgid, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("val", "val2014"), ("test", "val2014"), ("test", "val2014")]):
        filename = f"COCO_{folder}_{imgid:012d}.jpg" if coco else f"{1000 + imgid}.jpg"
        if imgid != 4:  # the last image is missing
            write_image(images / (folder if coco else "") / filename, imgid)
        sentences = [{"tokens": ["a", "photo", str(j)], "raw": f"A photo number {imgid} caption {j}.", "imgid": imgid, "sentid": imgid * 5 + j} for j in range(5)]
        entry = {"filename": filename, "imgid": imgid, "split": split, "sentences": sentences, "sentids": [s["sentid"] for s in sentences]}
        if coco:
            entry |= {"filepath": folder, "cocoid": imgid}
        entries.append(entry)
    split_json = root / ("dataset_coco.json" if coco else "dataset_flickr30k.json")
    split_json.write_text(json.dumps({"images": entries, "dataset": "coco" if coco else "flickr30k"}))
    return {"images": images, "split_json": split_json}


def write_nlvr2(root: Path) -> dict:
    images = root / "images"
    lines = []
    for n in range(4):
        stem = f"train-{100 + n}-0"
        if n != 3:  # pair 3 has no images
            for side in (0, 1):
                write_image(images / "train" / str(n % 2) / f"{stem}-img{side}.png", n * 2 + side, fmt="PNG")
        lines.append(json.dumps({
            "identifier": f"{stem}-{n % 2}", "sentence": f"there are {n} dogs", "label": "True" if n % 2 else "False",
            "left_url": "http://example.invalid/l.jpg", "right_url": "http://example.invalid/r.jpg",
            "writer": "w", "synset": "dog", "query": "dogs", "directory": str(n % 2),
        }))
    write_image(images / "dev" / "dev-7-1-img0.png", 50, fmt="PNG")
    write_image(images / "dev" / "dev-7-1-img1.png", 51, fmt="PNG")
    dev = [json.dumps({"identifier": "dev-7-1-0", "sentence": "one image has a cat", "label": "True"})]
    train_file = root / "train.json"
    train_file.write_text("\n".join(lines + ["{not json", json.dumps({"identifier": "train-9-0-0", "sentence": "x", "label": "maybe"})]) + "\n")
    dev_file = root / "dev.json"
    dev_file.write_text("\n".join(dev) + "\n")
    return {"images": images, "jsonl": [train_file, dev_file]}


def write_imagefolder(root: Path) -> dict:
    base = root / "imagenet"
    classes = ["n01440764", "n01443537", "n01484850"]
    for split, per_class in (("train", 3), ("val", 1)):
        for c, wnid in enumerate(classes):
            for i in range(per_class):
                write_image(base / split / wnid / f"{wnid}_{i}.JPEG", c * 10 + i)
    (base / "train" / classes[0] / "broken.JPEG").write_bytes(b"not an image")
    index = root / "imagenet_class_index.json"
    index.write_text(json.dumps({str(i): [wnid, name] for i, (wnid, name) in enumerate(zip(classes, ["tench", "goldfish", "great_white_shark"]))}))
    return {"root": base, "class_index": index, "classes": classes}


def write_ade20k(root: Path) -> dict:
    base = root / "ADEChallengeData2016"
    for folder, count in (("training", 3), ("validation", 2)):
        for i in range(1, count + 1):
            name = f"ADE_{'train' if folder == 'training' else 'val'}_{i:08d}"
            write_image(base / "images" / folder / f"{name}.jpg", i)
            if (folder, i) == ("training", 3):
                continue  # no annotation
            mask = np.zeros((40, 48), dtype=np.uint8)
            mask[:20] = 1  # wall
            mask[20:, :24] = 150
            (base / "annotations" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask, mode="L").save(base / "annotations" / folder / f"{name}.png")
    with open(base / "objectInfo150.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Idx", "Ratio", "Train", "Val", "Name"])
        for i in range(1, 151):
            writer.writerow([i, 0.01, 100, 10, "wall" if i == 1 else f"thing{i};other"])
    return {"root": base}
