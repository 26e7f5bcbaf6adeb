"""`tracking:` in a job file: every stage of a small pipeline logs its resolved
spec, lineage, training curves, results and outputs to a real MLflow tracking
server on 127.0.0.1 (sqlite store) and to W&B in offline mode; both read back
with the services' own clients and compared with the run directory's records."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlcluster.cli import main

pytest.importorskip("mlflow")

TRACKED_JOB = """
name: tracked
tracking:
  {tracking}
stages:
  data: {{kind: data, n_train: 48, n_val: 16, shard_size: 24, image_size: 16}}
  seed:
    kind: pretrain
    model: {{size: tiny, arch: agnostic, image_size: 16}}
    data: {{from: data}}
    train: {{steps: 3, batch_size: 8, log_every: 1, seed: 4}}
  vlpt:
    kind: pretrain
    model: {{size: tiny, arch: specific, image_size: 16}}
    init: {{from: seed}}
    data: {{from: data}}
    train: {{steps: 4, batch_size: 8, log_every: 1, seed: 4}}
    checkpoint: {{every: 2, keep: 2}}
  merge: {{kind: merge, source: vlpt, method: interpolation, alpha: 0.75}}
  metrics: {{kind: metrics, source: vlpt}}
"""
STAGES = ("data", "seed", "vlpt", "merge", "metrics")
# The default run's variant: one data, one training, one eval and one report stage
# (the report's table is the paper's Table 1 layout, one row here).
SMALL_JOB = """
name: tracked-small
tracking:
  {tracking}
stages:
  data: {{kind: data, n_train: 16, n_val: 8, shard_size: 16, image_size: 16}}
  seed:
    kind: pretrain
    model: {{size: tiny, arch: agnostic, image_size: 16}}
    data: {{from: data}}
    train: {{steps: 2, batch_size: 8, log_every: 1}}
  eval: {{kind: eval, source: seed, data: {{from: data}}, tasks: [retrieval], batch_size: 8}}
  table1: {{kind: report, title: Table 1 (tracked), rows: {{seed: eval}}}}
"""
SMALL_STAGES = ("data", "seed", "eval", "table1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a sqlite backend store and a local artifact root."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_HOST": "127.0.0.1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def run_tracked(root: Path, job_text: str, mlflow_server: str, experiment: str) -> Path:
    """Run a job tracked by MLflow and W&B (offline) at the same time."""
    pytest.importorskip("wandb")
    job = root / "job.yaml"
    job.write_text(job_text.format(tracking=f"mlflow: {{tracking_uri: '{mlflow_server}', experiment: {experiment}}}\n"
                                            "  wandb: {project: vlcluster-tests, mode: offline}"))
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("WANDB_DATA_DIR", str(root / "wandb-data"))  # staged artifact copies: here, not in ~/.local/share
        assert main(["submit", str(job), "--run-dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture(scope="module")
def tracked_small(mlflow_server, tmp_path_factory) -> Path:
    return run_tracked(tmp_path_factory.mktemp("tracked-small"), SMALL_JOB, mlflow_server, "tracked-small")


@pytest.fixture(scope="module")
def tracked_study(mlflow_server, tmp_path_factory) -> Path:
    return run_tracked(tmp_path_factory.mktemp("tracked"), TRACKED_JOB, mlflow_server, "tracked-study")


def tensorboard_scalars(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stage_dir / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def result_numbers(stage_dir: Path) -> dict[str, float]:
    result = json.loads((stage_dir / "result.json").read_text())
    return {key: value for key, value in result.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def mlflow_runs(mlflow_server: str, run_dir: Path, experiment: str, stages: tuple[str, ...]) -> dict:
    """Every stage's MLflow run, checked against the run directory: spec, hash, results,
    artifacts and every TensorBoard curve."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    found = client.get_experiment_by_name(experiment)
    runs = {run.info.run_name: run for run in client.search_runs([found.experiment_id])}
    assert set(runs) == set(stages) and all(run.info.status == "FINISHED" for run in runs.values())
    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    for stage in stages:
        run = runs[stage]
        spec = pipeline["pipeline"]["stages"][stage]
        assert run.data.tags["pipeline"] == pipeline["pipeline"]["name"] and run.data.tags["spec_hash"] == pipeline["hashes"][stage]
        assert run.data.params["kind"] == spec["kind"]
        assert "result.json" in {item.path for item in client.list_artifacts(run.info.run_id)}
        for key, value in result_numbers(run_dir / stage).items():
            assert run.data.metrics[f"result/{key}"] == pytest.approx(value), (stage, key)
        curves = tensorboard_scalars(run_dir / stage) if (run_dir / stage / "tb").is_dir() else {}
        for tag, points in curves.items():  # every TensorBoard curve, the same steps and values (MFU too where the peak is known: GPUs)
            history = client.get_metric_history(run.info.run_id, tag)
            assert [(p.step, p.value) for p in history] == [(step, pytest.approx(value, rel=1e-6)) for step, value in points], tag
    return {name: (client, run) for name, run in runs.items()}


def test_every_stage_logs_to_a_real_mlflow_server(mlflow_server, tracked_small):
    runs = mlflow_runs(mlflow_server, tracked_small, "tracked-small", SMALL_STAGES)
    client, seed = runs["seed"]
    assert seed.data.params["train.steps"] == "2" and seed.data.tags["arch"] == "agnostic" and seed.data.tags["k_seed"] == "2"
    assert {"loss/loss", "throughput/samples_per_s", "throughput/tflops_per_device"} <= set(seed.data.metrics)
    assert [p.step for p in client.get_metric_history(seed.info.run_id, "loss/loss")] == [1, 2]
    assert seed.data.metrics["result/steps"] == 2


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """A report's Markdown table as {row label: {column: cell text}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in rows}


def assert_table1(report: str, run_dir: Path) -> None:
    """The report's table is the run dir's report.md, its numbers the eval's result.json."""
    assert report == (run_dir / "table1" / "report.md").read_text()
    evaluated = json.loads((run_dir / "eval" / "result.json").read_text())
    row = table_rows(report)["seed"]
    assert {column: row[column] for column in ("TR", "TR R@1", "IR", "IR R@1")} == {
        "TR": f"{evaluated['tr']:.2f}", "TR R@1": f"{evaluated['tr_r1']:.2f}",
        "IR": f"{evaluated['ir']:.2f}", "IR R@1": f"{evaluated['ir_r1']:.2f}"}
    assert row["VQA acc"] == "–"  # a pre-trained model has no VQA head: the cell is empty, not a number


def test_eval_results_and_table1_read_back_from_mlflow(mlflow_server, tracked_small, tmp_path):
    runs = mlflow_runs(mlflow_server, tracked_small, "tracked-small", SMALL_STAGES)
    evaluated = json.loads((tracked_small / "eval" / "result.json").read_text())
    client, eval_run = runs["eval"]
    for key in ("tr", "tr_r1", "tr_r5", "tr_r10", "ir", "ir_r1", "ir_r5", "ir_r10"):
        assert eval_run.data.metrics[f"result/{key}"] == pytest.approx(evaluated[key]), key
    table1 = runs["table1"][1]
    for key in ("tr", "tr_r1", "ir", "ir_r1"):
        assert table1.data.metrics[f"result/rows.seed.{key}"] == pytest.approx(evaluated[key]), key
    report = Path(client.download_artifacts(table1.info.run_id, "report.md", str(tmp_path))).read_text()
    assert_table1(report, tracked_small)
    assert "study/report.md" in {item.path for item in client.list_artifacts(table1.info.run_id, "study")}


@pytest.mark.heavy
def test_a_study_logs_its_lineage_to_mlflow(mlflow_server, tracked_study):
    runs = mlflow_runs(mlflow_server, tracked_study, "tracked-study", STAGES)
    client, vlpt = runs["vlpt"]
    assert vlpt.data.params["train.steps"] == "4" and vlpt.data.params["init.from"] == "seed"
    assert vlpt.data.tags["arch"] == "specific" and vlpt.data.tags["k_seed"] == "3" and vlpt.data.tags["k_vl"] == "4"
    merge = runs["merge"][1]
    assert merge.data.tags["merge_knob"] == "alpha=0.75" and merge.data.tags["replicate_seeds"] == "4,4"
    merged = {item.path for item in client.list_artifacts(merge.info.run_id)}
    assert "model.json" in merged and not any(path.endswith(".safetensors") for path in merged)


def wandb_records(offline_run: Path, *flags: str):
    """The offline run's records (or its summary), read by wandb's own inspector."""
    command = [str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", *flags, str(offline_run)]
    output = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(output) if flags else [json.loads(line) for line in output.splitlines() if line.strip()]


def wandb_summaries(run_dir: Path, stages: tuple[str, ...]) -> dict[str, dict]:
    """Every stage's offline W&B run, checked against the run directory: name, group,
    state, results in the summary and every TensorBoard curve in the history."""
    summaries = {}
    for stage in stages:
        (offline_run,) = (run_dir / stage / "wandb" / "wandb").glob("offline-run-*")
        summary = summaries[stage] = wandb_records(offline_run, "--summary")
        assert summary["name"] == stage and summary["project"] == "vlcluster-tests" and summary["state"] == "finished"
        assert summary["exit_code"] == 0 and summary["config"]["kind"] == json.loads((run_dir / stage / "result.json").read_text())["kind"]
        for key, value in result_numbers(run_dir / stage).items():
            assert summary["summary"][f"result/{key}"] == pytest.approx(value), (stage, key)
        records = wandb_records(offline_run)
        (run,) = [record["run"] for record in records if record["type"] == "run"]
        assert run["run_group"] == json.loads((run_dir / "pipeline.json").read_text())["pipeline"]["name"]
        history = [record["history"] for record in records if record["type"] == "history"]
        for tag, points in tensorboard_scalars(run_dir / stage).items() if (run_dir / stage / "tb").is_dir() else ():
            logged = [(h["step"]["num"], h["item"][tag]) for h in history if tag in h["item"]]
            assert logged == [(step, pytest.approx(value, rel=1e-6)) for step, value in points], (stage, tag)
    return summaries


def test_every_stage_writes_an_offline_wandb_run(tracked_small):
    seed = wandb_summaries(tracked_small, SMALL_STAGES)["seed"]
    assert seed["config"]["train.steps"] == "2" and seed["config"]["lineage/pipeline"] == "tracked-small"
    assert seed["summary"]["loss/loss"] == pytest.approx(tensorboard_scalars(tracked_small / "seed")["loss/loss"][-1][1], rel=1e-6)


def test_eval_results_and_table1_read_back_from_wandb(tracked_small):
    summaries = {stage: wandb_records(next((tracked_small / stage / "wandb" / "wandb").glob("offline-run-*")), "--summary")
                 for stage in ("eval", "table1")}  # every stage's full check: test_every_stage_writes_an_offline_wandb_run
    evaluated = json.loads((tracked_small / "eval" / "result.json").read_text())
    for key in ("tr", "tr_r1", "ir", "ir_r1"):
        assert summaries["eval"]["summary"][f"result/{key}"] == pytest.approx(evaluated[key]), key
        assert summaries["table1"]["summary"][f"result/rows.seed.{key}"] == pytest.approx(evaluated[key]), key
    (offline_run,) = (tracked_small / "table1" / "wandb" / "wandb").glob("offline-run-*")
    (artifact,) = [record["artifact"] for record in wandb_records(offline_run) if record["type"] == "artifact"]
    files = {entry["path"]: entry for entry in artifact["manifest"]["contents"]}
    assert {"report.md", "result.json", "study/report.md"} <= set(files)
    assert Path(files["report.md"]["local_path"]).is_relative_to(tracked_small.parent / "wandb-data")
    staged = Path(files["report.md"]["local_path"])  # the copy wandb keeps until `wandb sync` uploads it
    assert base64.b64encode(hashlib.md5(staged.read_bytes()).digest()).decode() == files["report.md"]["digest"]
    assert_table1(staged.read_text(), tracked_small)


@pytest.mark.heavy
def test_a_study_logs_its_lineage_to_wandb(tracked_study):
    vlpt = wandb_summaries(tracked_study, STAGES)["vlpt"]
    assert vlpt["config"]["train.steps"] == "4" and vlpt["config"]["lineage/k_seed"] == "3"


def test_missing_tracking_extra_is_one_paragraph(tmp_path, monkeypatch):
    from vlcluster.errors import SpecError
    from vlcluster.tracking import stage_tracking

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if vlcluster[tracking] were not installed
    with pytest.raises(SpecError) as info, stage_tracking(saved_context(tmp_path, "wandb: {project: p, mode: offline}")):
        pass
    message = " ".join(str(info.value).split())
    assert "tracking.wandb needs the optional package 'wandb'" in message and ".[tracking]" in message


def test_missing_tracking_extra_stops_the_submit_before_anything_runs(write_job, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    job = write_job("name: t\ntracking: {mlflow: {tracking_uri: 'http://127.0.0.1:9'}}\nstages:\n"
                    "  data: {kind: data, n_train: 8, n_val: 4, shard_size: 8, image_size: 16}\n")
    assert main(["submit", str(job), "--run-dir", str(tmp_path / "run")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "tracking.mlflow needs the optional package 'mlflow'" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "data").exists()


def test_an_unreachable_tracking_server_does_not_fail_the_stage(tmp_path, caplog, monkeypatch):
    import logging

    from vlcluster.tracking import stage_tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    ctx = saved_context(tmp_path, f"mlflow: {{tracking_uri: 'http://127.0.0.1:{free_port()}'}}")
    with caplog.at_level(logging.WARNING, "vlcluster.tracking"), stage_tracking(ctx) as tracker:
        assert tracker is not None and tracker.adapters == []
    assert "tracking.mlflow: cannot start a run" in caplog.text


def saved_context(tmp_path: Path, tracking: str):
    from vlcluster.stages.context import StageContext, save_pipeline
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import load_pipeline

    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\ntracking: {{{tracking}}}\nstages:\n"
                   "  data: {kind: data, n_train: 8, n_val: 4, shard_size: 8, image_size: 16}\n")
    graph = build_graph(load_pipeline(job), str(job))
    save_pipeline(tmp_path, graph)
    return StageContext(tmp_path, "data", graph)


def test_a_parameter_past_mlflows_limit_is_shortened_not_refused(mlflow_server):
    from mlflow.tracking import MlflowClient

    from vlcluster.tracking.mlflow_adapter import MAX_VALUE, MlflowAdapter
    from vlcluster.tracking.spec import MlflowSpec

    shards = json.dumps([f"s3://bucket/shards/train-{i:06d}.tar" for i in range(400)])  # ~14,000 characters
    adapter = MlflowAdapter(MlflowSpec(tracking_uri=mlflow_server), "long-params", "seed", {"data.train": shards, "kind": "pretrain"}, {})
    adapter.finish(True)
    logged = MlflowClient(tracking_uri=mlflow_server).get_run(adapter.run_id).data.params
    assert logged["kind"] == "pretrain" and len(logged["data.train"]) == MAX_VALUE and shards.startswith(logged["data.train"][:-1])


def test_credentials_in_the_tracking_section_are_refused(write_job):
    from vlcluster.errors import SpecError
    from vlcluster.jobspec.load import load_pipeline

    for text in ("wandb: {project: p, api_key: abc123secretvalue}",
                 "mlflow: {tracking_uri: 'https://bob:hunter2@mlflow.example.com'}"):
        path = write_job(f"name: t\ntracking: {{{text}}}\nstages:\n"
                         "  data: {kind: data, n_train: 8, n_val: 4, shard_size: 8, image_size: 16}\n")
        with pytest.raises(SpecError) as info:
            load_pipeline(path)
        assert "hunter2" not in str(info.value) and "abc123secretvalue" not in str(info.value)


RESUMED_JOB = """
name: tracked-resume
tracking:
  {tracking}
stages:
  data: {{kind: data, n_train: 16, n_val: 8, shard_size: 16, image_size: 16}}
  seed:
    kind: pretrain
    model: {{size: tiny, arch: agnostic, image_size: 16}}
    data: {{from: data}}
    train: {{steps: 8, batch_size: 8, log_every: 1}}
    checkpoint: {{every: 2, keep: 2}}
"""


def submit_and_kill_after_checkpoint(job: Path, run_dir: Path, log_file: Path) -> None:
    """Submit in its own session and SIGKILL all of it (submitter, torchrun, rank)
    once the seed stage has committed its first checkpoint."""
    from tests.support.trials import committed_steps

    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_DATA_DIR": str(run_dir.parent / "wandb-data")}
    with open(log_file, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(run_dir)],
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + 120
        while not committed_steps(run_dir):
            assert process.poll() is None, log_file.read_text()
            assert time.monotonic() < deadline, "no checkpoint in 120 s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_resumed_stage_continues_its_tracking_runs(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.support.trials import resumed_from

    pytest.importorskip("wandb")
    job = tmp_path / "job.yaml"
    job.write_text(RESUMED_JOB.format(tracking=f"mlflow: {{tracking_uri: '{mlflow_server}', experiment: tracked-resume}}\n"
                                                "  wandb: {project: vlcluster-tests, mode: offline}"))
    run_dir = tmp_path / "run"
    submit_and_kill_after_checkpoint(job, run_dir, tmp_path / "killed.log")
    first = json.loads((run_dir / "seed" / "tracking.json").read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
        assert main(["submit", str(job), "--run-dir", str(run_dir)]) == 0
    resumed = resumed_from((run_dir / "seed" / "logs" / "stage.log").read_text())
    assert resumed is not None and resumed >= 2
    assert json.loads((run_dir / "seed" / "tracking.json").read_text()) == first  # the same runs, continued

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tracked-resume").experiment_id
    (seed,) = [run for run in client.search_runs([experiment]) if run.info.run_name == "seed"]  # one run, not one per attempt
    assert seed.info.run_id == first["mlflow"] and seed.info.status == "FINISHED"
    history = client.get_metric_history(seed.info.run_id, "loss/loss")
    latest = {point.step: point.value for point in sorted(history, key=lambda p: p.timestamp)}
    curve = tensorboard_scalars(run_dir / "seed")["loss/loss"]  # TensorBoard drops the killed attempt's steps past the resume
    assert sorted(latest) == [step for step, _ in curve] == list(range(1, 9))
    assert [latest[step] for step, _ in curve] == [pytest.approx(value, rel=1e-6) for _, value in curve]
    assert seed.data.metrics["result/steps"] == 8

    offline = sorted((run_dir / "seed" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and {path.name.rsplit("-", 1)[1] for path in offline} == {first["wandb"]}  # one run id: `wandb sync` appends
    # The killed attempt's file holds what wandb's service had written when it was killed with the
    # rest of the job (often nothing past the header); the resumed one continues the same run.
    records = [record for attempt in offline for record in wandb_records(attempt)]
    runs = [record["run"] for record in records if record["type"] == "run"]
    assert {run["run_id"] for run in runs} == {first["wandb"]} and runs[-1]["resume"] is True
    logged = {h["step"]["num"]: h["item"]["loss/loss"] for h in (r["history"] for r in records if r["type"] == "history")
              if "loss/loss" in h["item"]}
    assert set(range(resumed + 1, 9)) <= set(logged)
    assert all(logged[step] == pytest.approx(value, rel=1e-6) for step, value in curve if step in logged)
    final = wandb_records(offline[-1], "--summary")
    assert final["state"] == "finished" and final["summary"]["result/steps"] == 8


def test_a_forged_tracking_record_starts_new_runs(tmp_path, caplog):
    import logging

    from vlcluster.tracking.resume import record_run_ids, recorded_run_ids

    record_run_ids(tmp_path, "abc", {"mlflow": "0123456789abcdef0123456789abcdef", "wandb": "otc3kk10"})
    assert recorded_run_ids(tmp_path, "abc") == {"mlflow": "0123456789abcdef0123456789abcdef", "wandb": "otc3kk10"}
    with caplog.at_level(logging.WARNING, "vlcluster.tracking"):
        assert recorded_run_ids(tmp_path, "another spec") == {}  # a stage re-run with another spec: new runs
        (tmp_path / "tracking.json").write_text(json.dumps({"spec_hash": "abc", "mlflow": "../../etc", "wandb": ["x"]}))
        assert recorded_run_ids(tmp_path, "abc") == {}
        (tmp_path / "tracking.json").write_text("{not json")
        assert recorded_run_ids(tmp_path, "abc") == {}
    text = caplog.text
    assert "tracking.json: spec_hash" in text and "tracking.json: mlflow: not a mlflow run id" in text
    assert "tracking.json: wandb: not a wandb run id" in text


def test_a_stage_in_an_object_store_logs_its_files_as_artifacts(s3_env):
    """The trackers upload local files: a stage directory on S3 has its small
    outputs fetched first (the same ones a local stage logs), and only what the
    store holds now."""
    import fsspec

    from vlcluster.storage.paths import run_path
    from vlcluster.tracking import ARTIFACT_MAX_BYTES, _artifacts

    url = "s3://runs/tracked/report"
    fs = fsspec.filesystem("s3")
    files = {"result.json": b'{"tr": 1.0}', "report.md": b"| a |", "study/k_seed.png": b"\x89PNG",
             "checkpoints/step_00000002/meta.json": b"{}", "logs/stage.log": b"log", "model.safetensors": b"x",
             "big.json": b" " * (ARTIFACT_MAX_BYTES + 1)}
    for name, data in files.items():
        fs.pipe(f"{url}/{name}", data)
    found = {(folder, path.name): path.read_bytes() for path, folder in _artifacts(run_path(url))}
    assert found == {("", "result.json"): files["result.json"], ("", "report.md"): files["report.md"],
                     ("study", "k_seed.png"): files["study/k_seed.png"]}
    fs.rm(f"{url}/report.md")
    assert sorted(name for _, name in {(folder, path.name) for path, folder in _artifacts(run_path(url))}) == ["k_seed.png", "result.json"]
