"""VQA v2 from the official JSON files and the COCO images.

Questions file: ``{"data_subtype": "train2014", "questions": [{"image_id", "question",
"question_id"}, ...]}``; annotations file: ``{"annotations": [{"question_id", "image_id",
"answers": [{"answer", "answer_confidence", "answer_id"}, ...], "multiple_choice_answer",
...}]}``; images named ``COCO_{data_subtype}_{image_id:012d}.jpg`` anywhere under the
image directory. Several question/annotation pairs (train2014, val2014) make several
splits. The answer vocabulary is the ``max_answers`` most frequent annotator answers of
the training split; each question's answers get the soft score min(#annotators / 3, 1).
Answers are normalised as the official evaluation compares them (``vqa_answers``:
punctuation, number words, articles, contractions) before they are counted, so
"Two." and "2" are one answer of the vocabulary.
A training question with no answer in the vocabulary is skipped (counted as
``unknown_answer``); a validation one is kept and can only score 0, as in the
official metric.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from vlcluster.importers.common import BadEntries, log, DatasetWriter, ImportFailed, ImportOptions, image_bytes, index_files, need_dir, need_file
from vlcluster.importers.vqa_answers import normalise_answer
from vlcluster.tasks.vqa import soft_score

SPLITS = {"train2014": "train", "val2014": "val", "test2015": "test", "test-dev2015": "test"}


def _load(path: Path, key: str) -> dict:
    try:
        payload = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportFailed(f"{path}: not JSON ({exc})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get(key), list):
        raise ImportFailed(f"{path}: expected an object with a {key!r} list (the official VQA v2 layout)")
    return payload


def _split_of(payload: dict, path: Path) -> tuple[str, str]:
    subtype = payload.get("data_subtype")
    if subtype not in SPLITS:
        raise ImportFailed(f"{path}: field data_subtype: {subtype!r} is not one of {sorted(SPLITS)}")
    return subtype, SPLITS[subtype]


def _answer_counts(annotation: dict) -> Counter:
    return Counter(normalise_answer(a["answer"]) for a in annotation["answers"])


def import_vqa2(options: ImportOptions, questions: list[str], annotations: list[str], images: str) -> dict:
    if len(questions) != len(annotations) or not questions:
        raise ImportFailed("vqa2: give one --annotations file per --questions file (same order)")
    files = index_files(need_dir(images, "--images"))
    bad = BadEntries()
    parts = []
    for q_path, a_path in zip(questions, annotations):
        q_payload = _load(need_file(q_path, "--questions"), "questions")
        a_payload = _load(need_file(a_path, "--annotations"), "annotations")
        subtype, split = _split_of(q_payload, Path(q_path))
        by_id = {}
        for entry in a_payload["annotations"]:
            try:
                by_id[int(entry["question_id"])] = {"answers": _answer_counts(entry)}
            except (KeyError, TypeError, ValueError, AttributeError):  # its question counts as missing_annotation
                log.warning("malformed annotation in %s: %s", a_path, str(entry)[:120])
        parts.append((q_path, subtype, split, q_payload["questions"], by_id))
    vocabulary = _vocabulary(parts, options.max_answers)
    known = set(vocabulary)
    writer = DatasetWriter(options, "vqa", "vqa2")
    unanswerable_kept = 0
    for q_path, subtype, split, entries, by_id in parts:
        per_image: dict[int, list[dict]] = defaultdict(list)
        for entry in entries:
            bad.entries += 1
            try:
                image_id, question, question_id = int(entry["image_id"]), str(entry["question"]), int(entry["question_id"])
            except (KeyError, TypeError, ValueError):
                bad.add("malformed_question", f"{q_path}: {str(entry)[:120]}")
                continue
            annotation = by_id.get(question_id)
            if annotation is None:
                bad.add("missing_annotation", f"{q_path}: question {question_id}")
                continue
            answers = [[a, soft_score(n)] for a, n in sorted(annotation["answers"].items()) if a in known]
            if not answers and split == "train":
                bad.add("unknown_answer", f"{q_path}: question {question_id} ({', '.join(annotation['answers'])})")
                continue
            unanswerable_kept += not answers
            per_image[image_id].append({"question": question, "answers": answers, "question_id": question_id})
        for image_id, qa in sorted(per_image.items()):
            name = f"COCO_{subtype}_{image_id:012d}.jpg"
            if name not in files:
                for _ in qa:
                    bad.add("missing_image", f"{name} ({len(qa)} questions)")
                continue
            try:
                ext, data = image_bytes(files[name], options.image_size)
            except ValueError as exc:
                for _ in qa:
                    bad.add("bad_image", f"{files[name]}: {exc}")
                continue
            sample = {"__key__": f"{subtype}-{image_id}", ext: data, "json": json.dumps({"image_id": image_id, "questions": qa}).encode()}
            writer.write(split, sample, [q["question"] for q in qa])
    bad.check("vqa2", options.max_bad_fraction)
    return writer.finish(vocabulary, bad, {"unanswerable_kept": unanswerable_kept})


def _vocabulary(parts, size: int) -> list[str]:
    counts: Counter = Counter()
    train_parts = [p for p in parts if p[2] == "train"] or parts  # no train split: count what there is
    for _, _, _, _, by_id in train_parts:
        for annotation in by_id.values():
            counts.update(annotation["answers"])
    # Most frequent first; ties alphabetically, so the vocabulary is a pure function of the files.
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]]
