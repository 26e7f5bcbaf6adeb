"""Importers on tiny files in the real on-disk formats (see tests/support/task_formats.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import task_formats
from vlcluster.data.stream import shard_items
from vlcluster.importers.common import ImportFailed, ImportOptions
from vlcluster.importers.registry import run_import
from vlcluster.importers.vqa_answers import normalise_answer
from vlcluster.tasks.dataset import read_task_data
from vlcluster.tasks.registry import get_task


def decoded(data, split: str, image_size: int | None = None) -> list[dict]:
    task = get_task(data.task)
    return [task.decode(raw, image_size) for url in data.splits[split] for raw in shard_items(url)]


def test_vqa2_answer_vocabulary_soft_scores_and_bad_entries(tmp_path):
    files = task_formats.write_vqa2(tmp_path)
    (train_q, train_a), (val_q, val_a) = files["files"]["train2014"], files["files"]["val2014"]
    out = tmp_path / "out"
    options = ImportOptions(out=str(out), max_answers=4, max_bad_fraction=0.5)
    record = run_import("vqa2", {"questions": [str(train_q), str(val_q)], "annotations": [str(train_a), str(val_a)], "images": str(files["images"])}, options)
    # Most frequent training answers: yes 18, blue 16, no 9, red 4 (2 and the rare ones drop out).
    assert record["labels"] == ["yes", "blue", "no", "red"]
    assert record["bad"] == {"missing_image": 2, "malformed_question": 2, "unknown_answer": 1}
    assert record["entries"] == 12
    data = read_task_data(out, "vqa", "test")
    train = decoded(data, "train")
    assert sorted(s["key"] for s in train) == ["train2014-25", "train2014-9"]
    questions = {q: dict(a) for s in train for q, a in s["questions"]}
    assert questions["what is shown 0?"] == {"yes": 1.0, "no": 1.0}  # 6 and 3 annotators: min(n/3, 1)
    assert questions["what is shown 1?"] == {"blue": 1.0, "red": pytest.approx(2 / 3)}
    assert [len(s["questions"]) for s in sorted(train, key=lambda s: s["key"])] == [1, 2]
    assert sum(len(s["questions"]) for s in decoded(data, "val")) == 4
    assert data.tokenizer and Path(data.tokenizer).is_file()


def test_vqa2_too_many_bad_entries_fail_with_the_reasons(tmp_path):
    files = task_formats.write_vqa2(tmp_path)
    train_q, train_a = files["files"]["train2014"]
    with pytest.raises(ImportFailed, match=r"vqa2: 4 of 7 entries are bad .*missing_image \(2\)"):
        run_import("vqa2", {"questions": [str(train_q)], "annotations": [str(train_a)], "images": str(files["images"])},
                   ImportOptions(out=str(tmp_path / "out"), max_answers=4))


@pytest.mark.parametrize("coco", [True, False], ids=["coco", "flickr30k"])
def test_karpathy_splits_with_five_captions(tmp_path, coco):
    files = task_formats.write_karpathy(tmp_path, coco=coco)
    out = tmp_path / "out"
    record = run_import("karpathy", {"split_json": str(files["split_json"]), "images": str(files["images"])},
                        ImportOptions(out=str(out), max_bad_fraction=0.5, image_size=16))
    assert {split: entry["count"] for split, entry in record["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert record["bad"] == {"missing_image": 1}
    data = read_task_data(out, "retrieval", "test")
    [val] = decoded(data, "val")
    assert val["captions"] == [f"A photo number 2 caption {j}." for j in range(5)]
    assert val["pixels"].shape == (16, 16, 3)


def test_nlvr2_pairs_labels_and_bad_lines(tmp_path):
    files = task_formats.write_nlvr2(tmp_path)
    out = tmp_path / "out"
    record = run_import("nlvr2", {"jsonl": [str(p) for p in files["jsonl"]], "images": str(files["images"])},
                        ImportOptions(out=str(out), max_bad_fraction=0.5))
    assert record["bad"] == {"missing_image": 1, "malformed_line": 2}
    data = read_task_data(out, "nlvr2", "test")
    train = decoded(data, "train")
    assert [(s["sentence"], s["label"]) for s in train] == [("there are 0 dogs", 0), ("there are 1 dogs", 1), ("there are 2 dogs", 0)]
    assert train[0]["pixels"].shape == (2, 40, 48, 3)
    [dev] = decoded(data, "val")
    assert dev["label"] == 1


def test_imagefolder_with_class_index(tmp_path):
    files = task_formats.write_imagefolder(tmp_path)
    out = tmp_path / "out"
    record = run_import("imagefolder", {"root": str(files["root"]), "class_index": str(files["class_index"])},
                        ImportOptions(out=str(out), max_bad_fraction=0.2))
    assert record["labels"] == ["tench", "goldfish", "great_white_shark"]
    assert record["bad"] == {"bad_image": 1}
    data = read_task_data(out, "classification", "test")
    assert sorted(s["label"] for s in decoded(data, "val")) == [0, 1, 2]
    assert sorted(s["label"] for s in decoded(data, "train")) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_ade20k_masks_keep_labels_and_ignore(tmp_path):
    files = task_formats.write_ade20k(tmp_path)
    out = tmp_path / "out"
    record = run_import("ade20k", {"root": str(files["root"])}, ImportOptions(out=str(out), max_bad_fraction=0.3))
    assert record["bad"] == {"missing_annotation": 1}
    assert len(record["labels"]) == 150 and record["labels"][0] == "wall" and record["labels"][1] == "thing2"
    data = read_task_data(out, "segmentation", "test")
    samples = decoded(data, "val")
    assert len(samples) == 2
    assert set(samples[0]["mask"].ravel().tolist()) == {0, 1, 150}  # 0: ignore


def test_cli_import_and_its_error_paragraph(tmp_path, capsys):
    from vlcluster.cli import main

    files = task_formats.write_karpathy(tmp_path)
    out = tmp_path / "out"
    assert main(["import", "karpathy", "--split-json", str(files["split_json"]), "--images", str(files["images"]),
                 "-o", str(out), "--max-bad-fraction", "0.5"]) == 0
    assert json.loads((out / "dataset.json").read_text())["task"] == "retrieval"
    assert main(["import", "karpathy", "--split-json", str(tmp_path / "nope.json"), "--images", str(files["images"]), "-o", str(out)]) == 2
    assert "--split-json" in capsys.readouterr().err


def test_job_files_check_import_inputs_and_which_task_reads_them(write_job):
    from vlcluster.errors import SpecError
    from vlcluster.jobspec.load import load_pipeline
    from vlcluster.graph import build_graph

    text = """
    name: b
    stages:
      data: {kind: data, n_train: 100, n_val: 10, shard_size: 50}
      seed: {kind: pretrain, data: {from: data}, train: {steps: 2, batch_size: 4}}
      imp: {kind: import, format: karpathy, inputs: {split_json: x.json, images: imgs}, tokenizer: {from: data}}
      ft: {kind: finetune, task: vqa, init: {from: seed}, data: {from: imp}, train: {steps: 2, batch_size: 4}}
      pre: {kind: pretrain, data: {from: imp}, train: {steps: 2, batch_size: 4}}
      ok: {kind: finetune, task: retrieval, init: {from: seed}, data: {from: imp}, train: {steps: 2, batch_size: 4}}
    """
    with pytest.raises(SpecError) as info:
        build_graph(load_pipeline(write_job(text)))
    message = str(info.value)
    assert "stages.ft.data.from: stage 'imp' imports retrieval data (karpathy); this stage has task 'vqa'" in message
    assert "stages.pre.data.from" in message and "stages.ok" not in message
    with pytest.raises(SpecError, match="missing input 'annotations'"):
        load_pipeline(write_job(text.replace("format: karpathy, inputs: {split_json: x.json, images: imgs}", "format: vqa2, inputs: {questions: q.json, images: i}")))


@pytest.mark.parametrize("typed, compared", [
    ("Two.", "2"), ("  the   Dog ", "dog"), ("an apple", "apple"), ("none", "0"), ("ten", "10"),
    ("dont know", "don't know"), ("isnt", "isn't"), ("well", "well"), ("its", "its"),
    ("black/white", "black white"), ("hot - dog", "hot dog"), ("yes!", "yes"), ("t-shirt", "t shirt"),
    ("1,000", "1000"), ("3.5", "3.5"), ("end.", "end"), ("12:30", "12:30"), ("(a) cat, dog", "cat dog"),
])
def test_vqa_answers_are_normalised_as_the_official_evaluation_compares_them(typed, compared):
    assert normalise_answer(typed) == compared


def import_arguments(fmt: str, root: Path, tokenizer: Path) -> tuple[list[str], str]:
    """`vlcluster import FMT ...` arguments as docs/guide/tasks.md shows them, on tiny files in the real format."""
    if fmt == "vqa2":
        files = task_formats.write_vqa2(root)
        (train_q, train_a), (val_q, val_a) = files["files"]["train2014"], files["files"]["val2014"]
        return ["--questions", str(train_q), "--annotations", str(train_a), "--questions", str(val_q),
                "--annotations", str(val_a), "--images", str(files["images"]), "--tokenizer", str(tokenizer)], "vqa"
    if fmt == "karpathy":
        files = task_formats.write_karpathy(root)
        return ["--split-json", str(files["split_json"]), "--images", str(files["images"]), "--tokenizer", str(tokenizer)], "retrieval"
    if fmt == "nlvr2":
        files = task_formats.write_nlvr2(root)
        return [*(word for path in files["jsonl"] for word in ("--jsonl", str(path))), "--images", str(files["images"]),
                "--tokenizer", str(tokenizer)], "nlvr2"
    if fmt == "imagefolder":
        files = task_formats.write_imagefolder(root)
        return ["--root", str(files["root"]), "--class-index", str(files["class_index"])], "classification"
    files = task_formats.write_ade20k(root)
    return ["--root", str(files["root"])], "segmentation"


@pytest.mark.parametrize("fmt", ["vqa2", "karpathy", "nlvr2", "imagefolder", "ade20k"])
def test_cli_imports_every_format_as_the_docs_show(fmt, tmp_path):
    """Each importer through `vlcluster import`, the text tasks with the
    pre-training tokenizer shipped beside the shards (the planted bad entries
    need a higher --max-bad-fraction than the default 5%)."""
    from tests.support.realdata import bert_wordpiece_tokenizer
    from vlcluster.cli import main

    tokenizer = bert_wordpiece_tokenizer(tmp_path / "bert-tokenizer.json", ["a photo of two dogs", "is there a red square"])
    arguments, task = import_arguments(fmt, tmp_path / "raw", tokenizer)
    out = tmp_path / "out"
    assert main(["import", fmt, *arguments, "-o", str(out), "--max-bad-fraction", "0.5"]) == 0
    record = json.loads((out / "dataset.json").read_text())
    assert record["task"] == task and record["format"].startswith(fmt)  # karpathy: karpathy-coco
    assert all(entry["count"] > 0 for entry in record["splits"].values())
    if "--tokenizer" in arguments:
        assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
