"""Preflight: every input of a pipeline checked from the submitting host
before anything is queued, every problem in one report (exit 2), against the
real S3 test server for the object-store ones. One storage configuration
serves a whole pipeline, and with wrong credentials the server refuses even
a missing bucket, so the wrong-credentials case is the same job submitted
again with a wrong secret."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import cli


def planted_job(tmp_path: Path) -> str:
    """A pipeline with problems planted: each line of the report must name one."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "questions.json").mkdir()  # a directory where the questions file should be: cannot be read as one
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations.json").write_text("[]")
    return f"""
name: planted
stages:
  d: {{kind: data, n_train: 16, n_val: 8, shard_size: 16}}
  vqa_in:
    kind: import
    format: vqa2
    inputs: {{questions: ["{tmp_path}/questions.json"], annotations: ["{tmp_path}/annotations.json"], images: "{tmp_path}/images"}}
  seed:
    kind: pretrain
    init: {{checkpoint: "{tmp_path}/beit-missing", format: beit}}
    data:
      train: "{tmp_path}/empty/*.tar"
      val: "s3://no-such-bucket/val-{{0..1}}.tar"
      tokenizer: "{tmp_path}/nope/tokenizer.json"
    train: {{steps: 1}}
    resources: {{profile: no-such-profile}}
  vlpt: {{kind: pretrain, init: {{from: d}}, data: {{from: d}}, train: {{steps: 1}}}}
"""


EXPECTED = {
    "missing checkpoint": "stages.seed.init.checkpoint: no such file or directory: {tmp}/beit-missing",
    "unreadable import file": "stages.vqa_in.inputs.questions[0]: {tmp}/questions.json is a directory; a file is expected",
    "empty shard pattern": "stages.seed.data.train: ",
    "bad tokenizer path": "stages.seed.data.tokenizer: no such file or directory: {tmp}/nope/tokenizer.json",
    "unknown profile": "stages.seed.resources.profile: cluster profile 'no-such-profile' not found",
    "missing bucket": "stages.seed.data.val: bucket 'no-such-bucket' of s3://no-such-bucket/val-{{0..1}}.tar does not exist",
    "init from a stage without a model": "stages.vlpt.init.from: stage 'd' is a data stage; expected",
}


def test_every_planted_problem_is_in_one_report_and_nothing_is_queued(write_job, tmp_path, s3_server):
    job = write_job(planted_job(tmp_path))
    run_dir = tmp_path / "run"
    env = {**s3_server.env, "AWS_ENDPOINT_URL": s3_server.endpoint}
    result = cli("submit", str(job), "--backend", "slurm", "--run-dir", str(run_dir), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    report = result.stderr
    assert f"{job}: 7 problem(s) with the inputs:" in report, report
    for problem, line in EXPECTED.items():
        assert line.format(tmp=tmp_path) in report, (problem, report)
    assert "no shard files match" in report.split("stages.seed.data.train: ")[1].splitlines()[0]
    assert "Traceback" not in report and not run_dir.exists()  # nothing queued, not even a run directory

    # wrong credentials: the S3 lines say so, and every other problem is still reported
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value-987"}
    result = cli("submit", str(job), "--backend", "slurm", "--run-dir", str(run_dir), env=wrong)
    assert result.returncode == 2 and "7 problem(s)" in result.stderr
    assert "stages.seed.data.val: " in result.stderr and "access denied; the credentials are wrong" in result.stderr
    assert "wrong-secret-value-987" not in result.stderr and not run_dir.exists()
    for problem in ("missing checkpoint", "unreadable import file", "unknown profile", "init from a stage without a model"):
        assert EXPECTED[problem].format(tmp=tmp_path) in result.stderr, problem


def test_a_dry_run_reports_the_same_problems_as_a_warning_and_lists_no_bucket(write_job, tmp_path):
    job = write_job(planted_job(tmp_path).replace("  vlpt: {kind: pretrain, init: {from: d}", "  vlpt: {kind: pretrain, init: {from: seed}"))
    result = cli("submit", str(job), "--backend", "slurm", "--dry-run", "--run-dir", str(tmp_path / "run"),
                 "--profile", "local")  # --profile replaces the unknown one before the check
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "3 problem(s)" in result.stderr  # checkpoint, import file, tokenizer
    # remote inputs and globs are listed by a submit only (a glob could walk a whole file system)
    assert "no-such-profile" not in result.stderr and "no-such-bucket" not in result.stderr and "empty" not in result.stderr
    assert "#SBATCH" in result.stdout


def test_a_checkpoint_directory_without_weights_is_a_problem(tmp_path):
    from vlcluster.model.external import WEIGHT_FILES
    from vlcluster.preflight import WEIGHT_FILES as CHECKED, weights_problem

    assert CHECKED == WEIGHT_FILES
    empty = tmp_path / "converted"
    empty.mkdir()
    assert weights_problem(str(empty), "stages.s.init.checkpoint") == (
        f"stages.s.init.checkpoint: {empty} holds no model.safetensors or pytorch_model.bin")
    (empty / "model.safetensors").write_bytes(b"")
    assert weights_problem(str(empty), "f") is None


def test_the_same_problem_in_every_copy_of_a_sweep_is_one_line():
    from vlcluster.preflight import collapse_copies

    lines = collapse_copies({
        "seed[train.steps=0]": ["stages.seed[train.steps=0].data.tokenizer: no such file or directory: t.json"],
        "seed[train.steps=5]": ["stages.seed[train.steps=5].data.tokenizer: no such file or directory: t.json",
                                "stages.seed[train.steps=5].init.checkpoint: no such file or directory: c"],
        "vlpt": ["stages.vlpt.data.tokenizer: no such file or directory: t.json"],
    })
    assert lines == ["stages.seed[2 copies].data.tokenizer: no such file or directory: t.json",
                     "stages.seed[train.steps=5].init.checkpoint: no such file or directory: c",
                     "stages.vlpt.data.tokenizer: no such file or directory: t.json"]
