"""The CLI on bad input and on plans: one-paragraph errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.support.cli import cli, cli_without
from tests.support.jobs import GOOD

@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        (GOOD, ["stages.seed.train.setps=3"], "stages.seed.train.setps: unknown key"),
        (GOOD, ["stages.seed.train.steps=lots"], "stages.seed.train.steps: Input should be a valid integer"),
        (GOOD, ["stages.seed.after=[vlpt]"], "the stages form a cycle: "),
        (GOOD, ["stages.vlpt.init.from=sed"], "stages.vlpt.init.from: unknown stage 'sed'"),
        (
            GOOD.replace("data: {from: data}, train: {steps: 2}}\n  vlpt", "data: {train: 'nowhere/shard-{0..3}.tar'}, train: {steps: 2}}\n  vlpt", 1),
            [],
            "stages.seed.data.train: 4 of 4 shard files missing (first: nowhere/shard-0.tar)",
        ),
        (  # issue: the over-long range was refused without naming the job file
            GOOD.replace("data: {from: data}, train: {steps: 2}}\n  vlpt", "data: {train: 'x/{0..99999999}.tar'}, train: {steps: 2}}\n  vlpt", 1),
            [],
            "stages.seed.data.train: Value error, x/{0..99999999}.tar: the braces expand to 100000000 shard URLs (at most 1000000)",
        ),
        (GOOD, ["stages.seed.sweep={train.steps.x: [1]}"], "stages.seed.sweep.train.steps.x: train.steps holds the value 2"),  # was a TypeError
    ],
)
def test_bad_spec_exits_nonzero_with_file_and_field(write_job, tmp_path, text, overrides, expected):
    path = write_job(text)
    args = ["submit", str(path), "--run-dir", str(tmp_path / "run")]
    for override in overrides:
        args += ["--set", override]
    result = cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert str(path) in result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was launched


def test_every_stage_kind_has_a_runner():
    from vlcluster.stages.kinds import KINDS, runner

    for kind in KINDS:
        assert callable(runner(kind)), kind


def test_every_stage_kind_is_one_module_with_its_spec_model_and_runner():
    from vlcluster.jobspec.models import StageBase
    from vlcluster.jobspec.pipeline import Stage
    from vlcluster.stages.kinds import KINDS, spec_model

    for kind, entry in KINDS.items():
        assert entry.spec.split(":")[0] == entry.runner.split(":")[0], kind
        model = spec_model(kind)
        assert issubclass(model, StageBase) and model.model_fields["kind"].annotation.__args__ == (kind,)
    assert [member.__name__ for member in Stage.__origin__.__args__] == [spec_model(kind).__name__ for kind in KINDS]


def test_local_backend_refuses_multi_node(write_job, tmp_path):
    result = cli("submit", str(write_job(GOOD)), "--set", "stages.seed.resources.nodes=2", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    assert "stages.seed.resources.nodes is 2" in result.stderr


def test_dry_run_plans_without_running(write_job, tmp_path):
    result = cli("submit", str(write_job(GOOD)), "--dry-run", "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 0
    assert "vlpt" in result.stdout and "run" in result.stdout
    assert not (tmp_path / "r").exists()


def test_plan_of_the_full_scale_seed_job():
    result = cli("plan", "jobs/seed_100k.yaml")
    assert result.returncode == 0, result.stderr
    assert "6x8" in result.stdout
    assert "6 node(s) x 8 rank(s); 8 GPU/node" in result.stdout
    assert "100000 steps, batch 1024 (21-22/rank), lr 0.0002, warm-up 2500; 9460 train shards" in result.stdout  # 4 corpora


def test_plan_of_quickstart():
    result = cli("plan", "jobs/quickstart.yaml", "--run-dir", "/nonexistent/run")
    assert result.returncode == 0, result.stderr
    for stage in ("data", "seed", "vlpt", "merge", "maa", "ft_merged", "eval_msa", "table1"):
        assert stage in result.stdout


def test_schema_prints_json():
    result = cli("schema")
    assert result.returncode == 0
    assert "stages" in json.loads(result.stdout)["properties"]


def test_plan_and_dry_run_do_not_import_torch(write_job, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        (shards / f"train-{index}.tar").write_bytes(b"")
    path = write_job(GOOD.replace("data: {from: data}, train: {steps: 2}}\n  vlpt", f"data: {{train: '{shards}/train-{{0..1}}.tar'}}, train: {{steps: 2}}}}\n  vlpt", 1))
    plan = cli_without(["torch"], "plan", str(path), "--run-dir", str(tmp_path / "run"))
    assert plan.returncode == 0, plan.stderr
    assert "seed: 1 node(s) x 1 rank(s)" in plan.stdout and "2 train shards" in plan.stdout
    dry = cli_without(["torch", "ray"], "submit", str(path), "--dry-run", "--backend", "slurm", "--run-dir", str(tmp_path / "run"))
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH" in dry.stdout


@pytest.mark.parametrize(("packages", "args", "extra"), [
    (["submitit"], ["submit", "{job}", "--dry-run", "--backend", "slurm"], "slurm"),
    (["submitit"], ["submit", "{job}", "--backend", "slurm"], "slurm"),
    (["ray"], ["submit", "{job}", "--dry-run", "--backend", "ray"], "ray"),
    (["s3fs"], ["plan", "{job}", "--run-dir", "s3://runs/x"], "s3"),
    (["upath"], ["status", "s3://runs/x"], "s3"),
    (["jsonschema"], ["render", "{job}", "--validate"], "k8s"),
])
def test_a_missing_extra_is_one_paragraph_naming_the_install(write_job, tmp_path, packages, args, extra):
    job = str(write_job(GOOD))
    result = cli_without(packages, *[arg.format(job=job) for arg in args])
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"pip install -e '.[{extra}]'" in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) <= 4  # one paragraph (wrapped by the console)


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"vlcluster {version('vlcluster')}"


def test_schema_into_head_exits_quietly():
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m vlcluster.cli schema | head -1"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (result.returncode, result.stdout, result.stderr) == (0, "{\n", "")


@pytest.mark.parametrize("args", [["schema"], ["--version"], ["plan", "jobs/quickstart.yaml"], ["plan", "--help"]])
def test_output_to_a_closed_pipe_exits_0_without_a_traceback(args):
    """The reader is gone before the first byte (``| head -0``): every write fails with EPIPE,
    through print, rich's console and argparse alike."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "vlcluster.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                                text=True, cwd=REPO, timeout=120)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize(("args", "expected"), [
    # a stage: named as unknown, with the closest one (not "stages.sed: missing 'kind'")
    (["plan", "{job}", "--set", "stages.sed.train.steps=5"], "--set stages.sed.train.steps: no stage 'sed' in this file (stages: data, seed, vlpt); did you mean 'seed'?"),
    # a field: the closest field of that model
    (["plan", "{job}", "--set", "stages.seed.train.setps=5"], "stages.seed.train.setps: unknown key; did you mean 'steps'?"),
    # an import format, a merge method, a backend: the closest entry of their registries
    (["import", "vqa3", "-o", "{tmp}/x"], "invalid choice: 'vqa3' (choose from 'vqa2', 'karpathy', 'nlvr2', 'imagefolder', 'ade20k'); did you mean 'vqa2'?"),
    (["merge", "{tmp}", "-o", "{tmp}/x", "--method", "tie"], "did you mean 'ties'?"),
    (["submit", "{job}", "--backend", "slrum"], "did you mean 'slurm'?"),
])
def test_did_you_mean(write_job, tmp_path, args, expected):
    result = cli(*[arg.format(job=write_job(GOOD), tmp=tmp_path) for arg in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "missing 'kind'" not in result.stderr
    assert expected in " ".join(result.stderr.split())  # the console wraps long lines


@pytest.mark.parametrize(("override", "expected"), [
    ("stages.seed.kind=pretrian", "stages.seed: unknown stage kind 'pretrian'; expected one of data, import, pretrain, finetune, "
                                  "grams, merge, metrics, eval, report; did you mean 'pretrain'?"),
    ("stages.vlpt.model.arch=specfic", "stages.vlpt.model.arch: Input should be 'specific', 'agnostic', 'custom_attn', "
                                       "'custom_ffn' or 'custom_ln'; did you mean 'specific'?"),
    ("stages.vlpt.init.from=sed", "stages.vlpt.init.from: unknown stage 'sed'; did you mean 'seed'?"),
    ("stages.vlpt.data.form=data", "stages.vlpt.data.form: unknown key; did you mean 'from'?"),  # a field named like a stage kind stays in the path
    ("stages.zzzz.train.steps=5", "no stage 'zzzz' in this file (stages: data, seed, vlpt); a new stage needs stages.zzzz.kind"),
    # the overrides' own errors name the file too
    ("stages.seed.train.steps.x=5", "--set stages.seed.train.steps.x: stages.seed.train.steps is not a mapping"),
    ("novalue", "--set 'novalue': expected KEY.PATH=VALUE"),
    ("stages.seed.train.steps=[unclosed", "--set stages.seed.train.steps: not valid YAML"),
])
def test_job_file_suggestions(write_job, override, expected):
    from vlcluster.errors import SpecError
    from vlcluster.jobspec.load import load_pipeline
    from vlcluster.graph import build_graph

    path = write_job(GOOD)
    with pytest.raises(SpecError) as caught:
        build_graph(load_pipeline(path, [override]), str(path))
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_overrides_may_create_a_stage_with_its_kind(write_job):
    from vlcluster.jobspec.load import load_pipeline

    pipeline = load_pipeline(write_job(GOOD), ["stages.extra.kind=data", "stages.extra.n_train=8"])
    assert pipeline.stages["extra"].n_train == 8


def test_suggestions_come_from_the_models_fields():
    from vlcluster.jobspec.load import known_names
    from vlcluster.jobspec.models import TrainSpec
    from vlcluster.stages.merge import MergeStage
    from vlcluster.merge.methods import METHOD_NAMES

    assert known_names(("stages", "s", "pretrain", "train", "setps"), "extra_forbidden") == list(TrainSpec.model_fields)
    assert known_names(("stages", "m", "merge", "method"), "literal_error") == list(METHOD_NAMES)
    assert known_names(("stages", "m", "merge", "x"), "extra_forbidden") == [f.alias or n for n, f in MergeStage.model_fields.items()]
    assert known_names(("stages", "s", "pretrain", "init", "x"), "extra_forbidden") == ["from", "checkpoint", "format"]  # aliases as written


@pytest.mark.parametrize(("overrides", "steps"), [
    (["stages.seed.train.steps=5"], 5),  # as Hydra writes it
    (["stages.seed.train.steps=5", "--run-dir", "{tmp}/r", "stages.seed.train.steps=9"], 9),  # also after an option
    (["--set", "stages.seed.train.steps=7", "stages.seed.train.steps=5"], 5),  # with --set: the last written wins
    (["stages.seed.train.steps=5", "--set", "stages.seed.train.steps=3"], 3),
])
def test_positional_overrides_beside_set(write_job, tmp_path, overrides, steps):
    result = cli("plan", str(write_job(GOOD)), *[word.format(tmp=tmp_path) for word in overrides])
    assert result.returncode == 0, result.stderr
    assert f"seed: 1 node(s) x 1 rank(s); 0 GPU/node; {steps} steps," in result.stdout


def test_positional_overrides_are_checked_like_set(write_job):
    typo = cli("plan", str(write_job(GOOD)), "stages.sed.train.steps=5")
    assert typo.returncode == 2 and "no stage 'sed' in this file" in typo.stderr and "did you mean 'seed'?" in typo.stderr
    stray = cli("plan", str(write_job(GOOD)), "steps")
    assert stray.returncode == 2 and "'steps' is not KEY=VALUE" in stray.stderr
    elsewhere = cli("status", "runs/x", "a=1")  # only the commands that take --set take overrides
    assert elsewhere.returncode == 2 and "unrecognized arguments: a=1" in elsewhere.stderr


def rendered(*args: str) -> str:
    result = cli("render", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_render_slurm_is_the_dry_run_scripts(write_job, tmp_path):
    job, run_dir = str(write_job(GOOD)), str(tmp_path / "run")
    scripts = rendered(job, "--backend", "slurm", "--run-dir", run_dir, "stages.seed.train.steps=3")
    dry = cli("submit", job, "--backend", "slurm", "--dry-run", "--run-dir", run_dir, "stages.seed.train.steps=3")
    assert scripts.count("#!/bin/bash") == 3 and scripts in dry.stdout  # one renderer for both
    assert f"-m vlcluster.run {run_dir} seed" in scripts


def test_render_ray_lists_the_jobs_api_submissions(write_job, tmp_path):
    import yaml

    run_dir = tmp_path / "run"
    jobs = yaml.safe_load(rendered(str(write_job(GOOD)), "--backend", "ray", "--run-dir", str(run_dir)))
    assert [(job["stage"], job["starts_after"]) for job in jobs] == [("data", []), ("seed", ["data"]), ("vlpt", ["seed", "data"])]
    for job in jobs:
        request = job["submit_job"]
        assert f"-m vlcluster.backends.ray.stage {run_dir} {job['stage']} " in request["entrypoint"]
        assert request["metadata"]["stage"] == job["stage"] and request["submission_id"].startswith(f"vlcluster-c-{job['stage']}-")
        assert (request["entrypoint_num_cpus"], request["entrypoint_num_gpus"]) == (1, 0)


def test_render_local_lists_the_commands(write_job, tmp_path):
    import shlex

    run_dir = str(tmp_path / "run")
    commands = [shlex.split(line) for line in rendered(str(write_job(GOOD)), "--backend", "local", "--run-dir", run_dir).splitlines()
                if not line.startswith("#")]
    assert [command[-3:] for command in commands] == [["vlcluster.run", run_dir, name] for name in ("data", "seed", "vlpt")]
    assert "--nproc_per_node=1" in commands[1] and "torch.distributed.run" not in commands[0]


def test_render_k8s_carries_positional_overrides(write_job):
    import yaml

    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(rendered(str(write_job(GOOD)), "--backend", "k8s", "stages.seed.train.steps=3"))}
    assert set(objects) == {"ConfigMap", "RayCluster", "RayJob"}
    assert "--set stages.seed.train.steps=3" in objects["RayJob"]["spec"]["entrypoint"]


def test_render_writes_a_file_and_refuses_k8s_flags_elsewhere(write_job, tmp_path):
    job = str(write_job(GOOD))
    result = cli("render", job, "--backend", "slurm", "-o", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "sbatch.sh").read_text().count("#SBATCH --job-name=c.") == 3
    refused = cli("render", job, "--backend", "ray", "--validate")
    assert refused.returncode == 2 and "--validate checks k8s manifests" in refused.stderr


def test_logs_of_an_unknown_stage_names_the_closest(write_job, tmp_path):
    from vlcluster.stages.context import save_pipeline
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import load_pipeline

    path = write_job(GOOD)
    save_pipeline(tmp_path / "run", build_graph(load_pipeline(path), str(path)))
    result = cli("logs", str(tmp_path / "run"), "sed")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'run'}: no stage 'sed' in this run (stages: data, seed, vlpt); did you mean 'seed'?" in " ".join(result.stderr.split())
