"""Extending vlcluster, as docs/extending describes: a backend, a merge method,
a downstream task and a stage kind, each one new module plus one registry line
in a copy of the package (tests/support/extension.py checks the copy differs by
nothing else), run end to end through the CLI. The modules are
tests/support/extension_examples/*.py."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from tests.support.jobs import TINY_TRAINING_JOB
from tests.support.extension import REPO, PackageCopy, extended_package

EXAMPLES = Path(__file__).resolve().parents[1] / "support" / "extension_examples"


def tiny_merge_job(directory: Path, method: str | None = None) -> Path:
    """The tiny training job on one rank with a modality-specific model for 2
    steps, and a merge of it: data -> seed -> merge, seconds per stage."""
    spec = yaml.safe_load(TINY_TRAINING_JOB)
    seed = spec["stages"]["seed"]
    seed["model"]["arch"] = "specific"
    seed["train"]["steps"] = 2
    seed["resources"]["procs_per_node"] = 1
    spec["stages"]["merge"] = {"kind": "merge", "source": "seed", **({"method": method} if method else {})}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def status_rows(copy: PackageCopy, run_dir: Path) -> dict[str, list[str]]:
    """`vlcluster status`'s table: stage -> its cells (stage, kind, job, state, time, detail)."""
    status = copy.cli("status", str(run_dir), timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in status.stdout.splitlines() if line.count("│") > 3]
    return {row[0]: row for row in rows}  # the header row is drawn with ┃


def assert_reference_gains_only(copy: PackageCopy, name: str, pages: set[str]) -> None:
    """`python tools/gen_docs.py` on the copy changes the generated reference pages
    only by listing ``name`` among the choices it joined."""
    changes = copy.regenerated_reference()
    assert set(changes) == pages, changes
    for lines in changes.values():
        removed, added = [line[1:] for line in lines if line[0] == "-"], [line[1:] for line in lines if line[0] == "+"]
        assert len(removed) == len(added) > 0
        for before, after in zip(removed, added):
            assert re.sub(rf"`?{name}`?(,| \\\| )", "", after, count=1) == before, (before, after)


def test_a_backend_is_one_module_and_one_line(tmp_path):
    copy = extended_package(tmp_path / "pkg", "backends/inline.py", (EXAMPLES / "inline_backend.py").read_text(),
                            "backends/__init__.py", "BACKENDS: dict[str, str] = {",
                            '"inline": "vlcluster.backends.inline:InlineBackend",')
    job, run_dir = tiny_merge_job(tmp_path), tmp_path / "run"

    submitted = copy.cli("submit", str(job), "--backend", "inline", "--run-dir", str(run_dir))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "finished in" in submitted.stdout and "3 stages (3 ran, 0 already done)" in submitted.stdout
    rows = status_rows(copy, run_dir)
    assert {stage: row[3] for stage, row in rows.items()} == {"data": "done", "seed": "done", "merge": "done"}
    assert all(row[4].endswith(" s") for row in rows.values()), rows  # its records' times, as for a built-in backend
    for stage in rows:  # the new backend ran each stage as one plain python process
        record = json.loads((run_dir / stage / "state.json").read_text())
        assert record["backend"] == "inline" and record["command"][1:3] == ["-m", "vlcluster.run"], record
    assert (run_dir / "merge" / "model.safetensors").is_file()
    log = copy.cli("logs", str(run_dir), "seed", timeout=60)
    assert log.returncode == 0 and "step 2/2" in log.stdout and " inline " in log.stdout.splitlines()[0]

    rendered = copy.cli("render", str(job), "--backend", "inline", "-o", str(tmp_path / "rendered"), timeout=60)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    commands = (tmp_path / "rendered" / "commands.sh").read_text().splitlines()
    # every stage in order, one plain python process each, for the job's own run_dir
    assert [command.split()[1:] for command in commands] == [["-m", "vlcluster.run", "runs/faults", stage] for stage in rows]
    refused = copy.cli("submit", str(job), "--backend", "inline", "--run-dir", str(tmp_path / "run2"),
                       "--set", "stages.seed.resources.procs_per_node=2", timeout=60)
    assert refused.returncode != 0 and "stages.seed.resources asks for 2 ranks" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert_reference_gains_only(copy, "inline", {"cli.md"})


def max_magnitude(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The rule, written apart from the method: the largest |entry| wins, the first expert on a tie."""
    merged = tensors[0].clone()
    for tensor in tensors[1:]:
        merged = torch.where(tensor.abs() > merged.abs(), tensor, merged)
    return merged


def test_a_merge_method_is_one_module_and_one_line(tmp_path):
    copy = extended_package(tmp_path / "pkg", "merge/maxabs.py", (EXAMPLES / "maxabs_merge.py").read_text(),
                            "merge/methods.py", "SPECS: dict[str, MethodSpec] = {",
                            '"maxabs": MethodSpec((), "vlcluster.merge.maxabs"),')
    job, run_dir = tiny_merge_job(tmp_path, method="maxabs"), tmp_path / "run"

    submitted = copy.cli("submit", str(job), "--run-dir", str(run_dir))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    experts, merged = load_file(str(run_dir / "seed" / "model.safetensors")), load_file(str(run_dir / "merge" / "model.safetensors"))
    shared = [key for key in merged if ".shared." in key]
    assert len(shared) > 20
    for key in shared:
        found = [experts[key.replace(".shared.", f".{expert}.")] for expert in ("v", "l", "vl")
                 if key.replace(".shared.", f".{expert}.") in experts]
        assert len(found) >= 2, key
        assert torch.equal(merged[key], max_magnitude(found)), key
    assert any(key.replace(".shared.", ".vl.") in experts for key in shared)  # a group with a third expert was merged
    record = json.loads((run_dir / "merge" / "model.json").read_text())
    assert record["provenance"]["method"] == "maxabs"

    by_hand = copy.cli("merge", str(run_dir / "seed"), "-o", str(tmp_path / "by_hand"), "--method", "maxabs", timeout=120)
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    assert load_file(str(tmp_path / "by_hand" / "model.safetensors")).keys() == merged.keys()
    assert all(torch.equal(tensor, merged[key]) for key, tensor in load_file(str(tmp_path / "by_hand" / "model.safetensors")).items())
    assert_reference_gains_only(copy, "maxabs", {"cli.md", "job-schema.md"})


def tiny_task_job(directory: Path, task: str) -> Path:
    """The tiny training job's data and seed on one rank, the data stage also writing
    ``task``'s synthetic dataset, then a fine-tune on the task, its eval and a report."""
    spec = yaml.safe_load(TINY_TRAINING_JOB)
    stages = spec["stages"]
    stages["data"] |= {"tasks": [task], "task_n_train": 64, "task_n_val": 32}
    stages["seed"]["train"]["steps"] = 2
    stages["seed"]["resources"]["procs_per_node"] = 1
    stages["ft"] = {"kind": "finetune", "task": task, "init": {"from": "seed"}, "data": {"from": "data"},
                    "train": {"steps": 3, "batch_size": 8, "warmup_steps": 1, "log_every": 1},
                    "resources": {"procs_per_node": 1}}
    stages["eval"] = {"kind": "eval", "tasks": [task], "source": "ft", "data": {"from": "data"}}
    stages["table"] = {"kind": "report", "rows": {task: "eval"}}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_downstream_task_is_one_module_and_one_line(tmp_path):
    copy = extended_package(tmp_path / "pkg", "tasks/colours.py", (EXAMPLES / "colours_task.py").read_text(),
                            "tasks/registry.py", "TASKS: dict[str, TaskEntry] = {",
                            '"colours": TaskEntry("vlcluster.tasks.colours:ColoursTask", ("colours_acc",), "vision"),')
    job, run_dir = tiny_task_job(tmp_path, "colours"), tmp_path / "run"

    submitted = copy.cli("submit", str(job), "--run-dir", str(run_dir))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    rows = status_rows(copy, run_dir)
    assert {stage: row[3] for stage, row in rows.items()} == dict.fromkeys(("data", "seed", "ft", "eval", "table"), "done")

    record = json.loads((run_dir / "data" / "tasks" / "colours" / "dataset.json").read_text())
    assert record["labels"] == ["red", "green", "blue", "yellow", "purple"]  # the module's generator wrote it
    assert {split: entry["count"] for split, entry in record["splits"].items()} == {"train": 64, "val": 32}
    result = json.loads((run_dir / "eval" / "result.json").read_text())
    assert result["task"] == "colours" and result["examples"] == 32
    assert 0 <= result["colours_acc"] <= 100 and len(result["items"]["colours_acc"]) == 32
    assert result["colours_acc"] == sum(result["items"]["colours_acc"]) / 32
    assert result["chance"] == {"colours_acc": 100 / 2 ** 5}
    with_head = load_file(str(run_dir / "ft" / "model.safetensors"))
    assert with_head["heads.colours.weight"].shape[0] == 5  # one logit per colour
    table = (run_dir / "table" / "report.md").read_text()  # the report's columns follow the registry's scores
    assert "| IR R@1 | colours_acc |" in table and f"| colours | – | – | – | – | – | {result['colours_acc']:.2f} |" in table, table
    assert_reference_gains_only(copy, "colours", {"job-schema.md"})


def tiny_checksum_job(directory: Path) -> Path:
    """data -> seed (the tiny training job on one rank, 2 steps) -> a checksum of the seed's model."""
    spec = yaml.safe_load(TINY_TRAINING_JOB)
    spec["stages"]["seed"]["train"]["steps"] = 2
    spec["stages"]["seed"]["resources"]["procs_per_node"] = 1
    spec["stages"]["digest"] = {"kind": "checksum", "source": "seed", "algorithm": "blake2b"}
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def assert_schema_page_gains_kind(copy: PackageCopy, kind: str, model: str) -> None:
    """`python tools/gen_docs.py` on the copy adds the kind's table to job-schema.md and
    its link to the stages row, and changes nothing else."""
    assert set(copy.regenerated_reference()) == {"job-schema.md"}
    before = (REPO / "docs" / "reference" / "job-schema.md").read_text()
    after = (copy.root / "docs" / "reference" / "job-schema.md").read_text()
    table = re.search(rf"^## {model}\n.*?\n\n(?=## )", after, re.S | re.M)
    assert table is not None and "| `kind` |" in table[0] and "| `source` |" in table[0], after
    assert after.replace(table[0], "").replace(f"[{kind}](#{model.lower()}), ", "", 1) == before


def test_a_stage_kind_is_one_module_and_one_line(tmp_path):
    copy = extended_package(tmp_path / "pkg", "stages/checksum.py", (EXAMPLES / "checksum_stage.py").read_text(),
                            "stages/kinds.py", "KINDS: dict[str, StageKind] = {",
                            '"checksum": StageKind("vlcluster.stages.checksum:ChecksumStage", "vlcluster.stages.checksum:run"),')
    job, run_dir = tiny_checksum_job(tmp_path), tmp_path / "run"

    submitted = copy.cli("submit", str(job), "--run-dir", str(run_dir))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    rows = status_rows(copy, run_dir)
    assert {stage: (row[1], row[3]) for stage, row in rows.items()} == {
        "data": ("data", "done"), "seed": ("pretrain", "done"), "digest": ("checksum", "done")}
    result = json.loads((run_dir / "digest" / "result.json").read_text())
    weights = (run_dir / "seed" / "model.safetensors").read_bytes()
    assert result["kind"] == "checksum" and result["algorithm"] == "blake2b"
    assert result["digest"] == hashlib.blake2b(weights).hexdigest() and result["bytes"] == len(weights)

    # The kind's references reach the graph: it depends on its source and names the kinds it may be.
    refused = copy.cli("plan", str(job), "--run-dir", str(tmp_path / "run2"), "--set", "stages.digest.source=data", timeout=60)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "stages.digest.source: stage 'data' is a data stage; expected finetune, merge, pretrain" in " ".join(
        (refused.stdout + refused.stderr).split())
    assert_schema_page_gains_kind(copy, "checksum", "ChecksumStage")
