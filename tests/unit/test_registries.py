"""Every list of names has one source, its registry: the job-file Literals and
the CLI choices are built from the registry keys, so an entry added there is
accepted everywhere without a second edit."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import pytest


def literal_names(model, field: str) -> tuple:
    """The names a Literal field (possibly ``Literal[...] | None``) accepts."""
    annotation = model.model_fields[field].annotation
    if typing.get_origin(annotation) is not typing.Literal:
        annotation = next(arg for arg in typing.get_args(annotation) if typing.get_origin(arg) is typing.Literal)
    return typing.get_args(annotation)


def subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return parser


def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(action for action in parser._actions if flag in action.option_strings)


def registries() -> dict[str, tuple]:
    """Registry name -> its keys, in their order."""
    from vlcluster.backends import BACKENDS
    from vlcluster.importers.registry import FORMATS
    from vlcluster.merge.methods import SPECS
    from vlcluster.metrics import METRICS
    from vlcluster.metrics.correlation import DROP_SCORES
    from vlcluster.sizes import CHECKPOINT_FORMATS, CUSTOM_PARTS, POSITIONS, PRESETS, RELATIVE_BIASES

    return {"methods": tuple(SPECS), "formats": tuple(FORMATS), "backends": tuple(BACKENDS), "metrics": METRICS,
            "drop_scores": tuple(DROP_SCORES), "sizes": tuple(PRESETS), "archs": tuple(CUSTOM_PARTS),
            "positions": POSITIONS, "relative_biases": RELATIVE_BIASES, "checkpoint_formats": CHECKPOINT_FORMATS}


def test_job_file_literals_are_the_registry_keys():
    from vlcluster.jobspec import models
    from vlcluster.stages import imports, merge, report

    keys = registries()
    assert literal_names(merge.MergeStage, "method") == keys["methods"]
    assert literal_names(imports.ImportStage, "format") == keys["formats"]
    assert literal_names(merge.GateSpec, "metric") == keys["metrics"]
    assert literal_names(report.ReportStage, "drop_score") == keys["drop_scores"]
    assert literal_names(models.ModelSpec, "size") == keys["sizes"]
    assert literal_names(models.ModelSpec, "arch") == keys["archs"]
    assert literal_names(models.ModelSpec, "position") == keys["positions"]
    assert literal_names(models.ModelSpec, "relative_bias") == keys["relative_biases"]
    assert literal_names(models.InitSpec, "format") == keys["checkpoint_formats"]


def test_cli_choices_are_the_registry_keys():
    from vlcluster.cli import build_parser
    from vlcluster.merge.methods import PARAMS

    keys, parser = registries(), build_parser()
    merge = subparser(parser, "merge")
    assert tuple(option(merge, "--method").choices) == keys["methods"]
    # one flag per merge parameter (part_alpha: one per part family)
    flags = {flag for action in merge._actions for flag in action.option_strings}
    assert {f"--{name.replace('_', '-')}" for name in PARAMS if PARAMS[name].type is not dict} <= flags
    assert tuple(subparser(parser, "import").__dict__["_subparsers"]._group_actions[0].choices) == keys["formats"]
    assert sorted(option(subparser(parser, "submit"), "--backend").choices) == sorted(keys["backends"])
    assert set(option(subparser(parser, "render"), "--backend").choices) == {"k8s", *keys["backends"]}
    assert tuple(option(subparser(parser, "report"), "--score").choices) == keys["drop_scores"]
    assert tuple(option(subparser(parser, "convert"), "--size").choices) == keys["sizes"]
    assert (*option(subparser(parser, "convert"), "--from").choices, "vlcluster") == keys["checkpoint_formats"]


def test_merge_parameters_and_rendered_files_cover_their_registries():
    import importlib

    from vlcluster.backends import BACKENDS
    from vlcluster.stages.merge import MergeStage, PartAlpha
    from vlcluster.merge.methods import PARAMS, PART_FAMILY

    assert set(PARAMS) <= set(MergeStage.model_fields)  # also checked when jobspec is imported
    assert set(PartAlpha.model_fields) == set(PART_FAMILY.values())
    classes = [getattr(importlib.import_module(target.split(":")[0]), target.split(":")[1]) for target in BACKENDS.values()]
    rendered = {backend.name: backend.rendered_file for backend in classes}  # render -o takes the file name from the backend
    assert set(rendered) == set(BACKENDS) and all(isinstance(name, str) and name for name in rendered.values())
    assert {name: rendered[name] for name in ("local", "slurm", "ray")} == {"local": "commands.sh", "slurm": "sbatch.sh", "ray": "ray-jobs.yaml"}  # as the guide says


def test_study_names_come_from_the_registries():
    from vlcluster.merge.methods import SPECS
    from vlcluster.metrics import METRICS
    from vlcluster.study import lineage, verdicts, views

    assert views.DISTANCES == METRICS
    assert verdicts.VARIANTS == ("custom_attn", "custom_ffn", "custom_ln")
    knobs = {method: lineage.Merge("m", method, {"alpha": 0.3, "lam": 0.7, "gamma": 0.9}, False).knob for method in SPECS}
    paper_and_sparse = {"interpolation": ("alpha", 0.3), "arithmetic": ("lam", 0.7), "regmean": ("gamma", 0.9),
                        "ties": ("lam", 0.7), "dare": ("lam", 0.7)}
    assert {method: knobs[method] for method in paper_and_sparse} == paper_and_sparse  # a new method keeps these



def test_task_names_routes_scores_and_synthetic_data_come_from_the_task_registry(monkeypatch):
    from dataclasses import replace

    from vlcluster.importers.registry import FORMATS
    from vlcluster.stages.report import COLUMNS, TASK_COLUMNS
    from vlcluster.stages.train import FinetuneStage
    from vlcluster.study.views import PRIMARY
    from vlcluster.tasks.registry import HEADLINE_SCORES, TASKS, get_task

    assert literal_names(FinetuneStage, "task") == tuple(TASKS)
    for name, entry in TASKS.items():
        task = get_task(name)
        assert (task.name, task.route) == (name, entry.route)
        assert task.synthetic() is not None  # a data stage can write every task of the paper
    assert {fmt.task for fmt in FORMATS.values()} <= set(TASKS)  # an import format writes a registered task
    assert PRIMARY == HEADLINE_SCORES
    assert set(HEADLINE_SCORES) <= {key for _, key in COLUMNS + TASK_COLUMNS}  # the report stage shows each
    monkeypatch.setitem(TASKS, "vqa", replace(TASKS["vqa"], route="vision"))
    with pytest.raises(ValueError, match="VQATask takes the 'fusion' route, registered with 'vision'"):
        get_task.__wrapped__("vqa")

# One line added to each registry, in a copy of the package: the new names must reach
# job files and the command line with no other edit.
NEW_LINES = {
    "backends/__init__.py": ("BACKENDS: dict[str, str] = {", '"toyqueue": "vlcluster.backends.local:LocalBackend",'),
    "importers/registry.py": ("FORMATS: dict[str, Format] = {",
                              '"toyfmt": Format("vqa", "a toy set", "vlcluster.importers.vqa2:import_vqa2", (Input("root", "a directory"),)),'),
    "merge/methods.py": ("SPECS: dict[str, MethodSpec] = {", '"toymerge": MethodSpec(("alpha",), "vlcluster.merge.linear"),'),
    "metrics/correlation.py": ("DROP_SCORES: dict[str, tuple[str, ...]] = {", '"toyscore": ("vqa_acc", "tr"),'),
    "sizes.py": ("PRESETS: dict[str, dict[str, Any]] = {", '"toysize": dict(dim=64, depth=2, heads=2, vl_layers=1, image_size=32, '
                 'patch_size=8, mlp_ratio=4.0, itc_dim=64, vocab_size=64, max_text_len=32, num_answers=15),'),
    "sizes.py#formats": ("CHECKPOINT_FORMATS = (", '"toyckpt",'),
}

USE_NEW_NAMES = """
import json, sys

import vlcluster
from vlcluster.cli import build_parser
from vlcluster.jobspec.pipeline import Pipeline

stages = {
    "imp": {"kind": "import", "format": "toyfmt", "inputs": {"root": "data"}},
    "seed": {"kind": "pretrain", "model": {"size": "toysize"}, "data": {"train": "s/{0..1}.tar"}, "train": {"steps": 1},
             "init": {"checkpoint": "ckpt", "format": "toyckpt"}},
    "m": {"kind": "merge", "source": "seed", "method": "toymerge", "alpha": 0.25},
    "r": {"kind": "report", "rows": {"a": "m"}, "drop_score": "toyscore"},
}
pipeline = Pipeline.model_validate({"name": "toy", "stages": stages})
parser = build_parser()
args = [
    parser.parse_args(["submit", "job.yaml", "--backend", "toyqueue"]).backend,
    parser.parse_args(["render", "job.yaml", "--backend", "toyqueue"]).backend,
    parser.parse_args(["merge", "src", "-o", "out", "--method", "toymerge"]).method,
    parser.parse_args(["import", "toyfmt", "--root", "data", "-o", "out"]).root,
    parser.parse_args(["report", "run", "--score", "toyscore"]).score,
    parser.parse_args(["convert", "--from", "vit", "src", "-o", "out", "--size", "toysize"]).size,
    parser.parse_args(["convert", "--from", "toyckpt", "src", "-o", "out"]).from_format,
]
seed = pipeline.stages["seed"]
print(json.dumps({"stages": {n: s.model_dump(include={"format", "method", "drop_score"}) for n, s in pipeline.stages.items()},
                  "size": seed.model.size, "init": seed.init.format, "args": args, "torch": "torch" in sys.modules,
                  "package": vlcluster.__file__}))
"""


def test_a_line_added_to_a_registry_is_accepted_by_job_files_and_the_cli(tmp_path):
    import json

    from tests.support.extension import copy_package

    copy = copy_package(tmp_path)
    for where, (opening, line) in NEW_LINES.items():
        copy.add_registry_line(where.split("#")[0], opening, line)
    added, changed = copy.changes()
    assert not added and set(changed) == {where.split("#")[0] for where in NEW_LINES}
    done = copy.python("-c", USE_NEW_NAMES, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["stages"]["imp"] == {"format": "toyfmt"}
    assert found["stages"]["m"] == {"method": "toymerge"}
    assert found["stages"]["r"] == {"drop_score": "toyscore"}
    assert found["size"] == "toysize" and found["init"] == "toyckpt"
    assert found["args"] == ["toyqueue", "toyqueue", "toymerge", "data", "toyscore", "toysize", "toyckpt"]
    assert found["torch"] is False  # the tables the submit path reads stay torch-free
    assert Path(found["package"]).parent == copy.package


@pytest.mark.parametrize(("stage", "field", "registry"), [
    ({"kind": "import", "format": "vqa3", "inputs": {}}, "format", "formats"),
    ({"kind": "report", "rows": {"a": "m"}, "drop_score": "retrival"}, "drop_score", "drop_scores"),
])
def test_a_name_outside_the_registry_is_refused_with_the_registry_keys(stage, field, registry):
    from pydantic import ValidationError

    from vlcluster.jobspec.pipeline import Pipeline

    with pytest.raises(ValidationError) as caught:
        Pipeline.model_validate({"name": "x", "stages": {"s": stage}})
    message = str(caught.value)
    assert field in message and all(repr(name) in message for name in registries()[registry])


def test_command_defaults_are_the_stage_defaults():
    """``vlcluster import/data/metrics`` and the import/data/metrics stages compute alike when nothing is set."""
    from vlcluster.cli import build_parser
    from vlcluster.stages.data import DataStage
    from vlcluster.stages.imports import ImportStage
    from vlcluster.stages.metrics import MetricsStage

    parser = build_parser()
    imported = vars(parser.parse_args(["import", "nlvr2", "--jsonl", "a.jsonl", "--images", "img", "-o", "out"]))
    assert {name: imported[name] for name in ("shard_size", "max_answers", "max_bad_fraction")} == \
        {name: ImportStage.model_fields[name].default for name in ("shard_size", "max_answers", "max_bad_fraction")}
    data = vars(parser.parse_args(["data", "out"]))
    assert {name: data[name] for name in ("n_train", "n_val", "shard_size", "image_size", "seed")} == \
        {name: DataStage.model_fields[name].default for name in ("n_train", "n_val", "shard_size", "image_size", "seed")}
    assert parser.parse_args(["metrics", "ckpt"]).density == MetricsStage.model_fields["density"].default


def test_precision_names_are_the_trainers_dtypes_and_auto():
    """train/precision.py imports torch, so the job-file Literal stays a copy: checked here."""
    from vlcluster.jobspec.models import Precision
    from vlcluster.train.precision import DTYPES

    assert typing.get_args(Precision) == (*DTYPES, "auto")
