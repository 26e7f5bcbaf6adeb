"""Import formats by name: the function, its task and its inputs. A new format is one module plus one entry:
``vlcluster import FORMAT`` and the ``import`` stage's ``format`` take their names from this table, and both
run a format through :func:`run_import`."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vlcluster.suggest import did_you_mean

if TYPE_CHECKING:  # common.py imports PIL and the data layer; this table stays light for the CLI's parser
    from vlcluster.importers.common import ImportOptions


@dataclass(frozen=True)
class Input:
    name: str  # keyword of the import function, job-file key; CLI flag --name with _ -> -
    help: str
    required: bool = True
    many: bool = False  # may be given several times (a list)
    directory: bool = False  # a directory (else a file): what preflight checks it is


@dataclass(frozen=True)
class Format:
    task: str
    dataset: str  # what it reads, as `vlcluster import --help` names it
    # "module:function", imported only when an import runs: plan, submit and the
    # CLI's parser read this table without importing torch.
    function: str
    inputs: tuple[Input, ...]

    @property
    def run(self) -> Callable[..., dict]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)


FORMATS: dict[str, Format] = {
    "vqa2": Format("vqa", "VQA v2", "vlcluster.importers.vqa2:import_vqa2", (
        Input("questions", "official VQA v2 questions JSON (repeat for train and val)", many=True),
        Input("annotations", "the matching annotations JSON (same order)", many=True),
        Input("images", "directory holding the COCO images", directory=True),
    )),
    "karpathy": Format("retrieval", "COCO/Flickr30k", "vlcluster.importers.karpathy:import_karpathy", (
        Input("split_json", "Karpathy split file: dataset_coco.json or dataset_flickr30k.json"),
        Input("images", "image directory (COCO: holding train2014/ and val2014/)", directory=True),
    )),
    "nlvr2": Format("nlvr2", "NLVR2", "vlcluster.importers.nlvr2:import_nlvr2", (
        Input("jsonl", "NLVR2 JSON-lines file (repeat for train, dev, test1)", many=True),
        Input("images", "directory holding the *-img0.png / *-img1.png pairs", directory=True),
    )),
    "imagefolder": Format("classification", "ImageNet", "vlcluster.importers.imagefolder:import_imagefolder", (
        Input("root", "directory with train/ and val/ class folders", directory=True),
        Input("class_index", "class order: imagenet_class_index.json or one folder name per line", required=False),
    )),
    "ade20k": Format("segmentation", "ADE20k", "vlcluster.importers.ade20k:import_ade20k", (
        Input("root", "the ADEChallengeData2016 directory", directory=True),
    )),
}


def check_inputs(fmt: str, inputs: dict) -> list[str]:
    """Problems with ``inputs`` for ``fmt`` (empty when they fit)."""
    if fmt not in FORMATS:
        return [f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}{did_you_mean(fmt, FORMATS)}"]
    known = {i.name: i for i in FORMATS[fmt].inputs}
    problems = [f"unknown input {name!r} for {fmt} (expected {sorted(known)})" for name in inputs if name not in known]
    problems += [f"missing input {i.name!r} ({i.help})" for i in known.values() if i.required and i.name not in inputs]
    for name, value in inputs.items():
        if name in known and not known[name].many and not isinstance(value, str):
            problems.append(f"input {name!r} takes one path, got {value!r}")
    return problems


def run_import(fmt: str, inputs: dict, options: ImportOptions) -> dict:
    """Run format ``fmt``'s importer on ``inputs`` (name -> path, or paths for an
    input that takes many): its record plus the seconds it took."""
    spec = FORMATS[fmt]
    arguments = {i.name: ([inputs[i.name]] if isinstance(inputs[i.name], str) else list(inputs[i.name])) if i.many else inputs[i.name]
                 for i in spec.inputs if i.name in inputs}
    started = time.perf_counter()
    record = spec.run(options, **arguments)
    return {**record, "seconds": time.perf_counter() - started}
