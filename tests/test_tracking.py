"""`tracking:` in a job file: every stage of a small pipeline logs its resolved
spec, lineage, training curves, results and outputs to a real MLflow tracking
server on 127.0.0.1 (sqlite store) and to W&B in offline mode; both read back
with the services' own clients and compared with the run directory's records."""

from __future__ import annotations

import json
import os
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


def run_tracked(tmp_path: Path, tracking: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(TRACKED_JOB.format(tracking=tracking))
    run_dir = tmp_path / "run"
    assert main(["submit", str(job), "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_every_stage_logs_to_a_real_mlflow_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = run_tracked(tmp_path, f"mlflow: {{tracking_uri: '{mlflow_server}', experiment: tracked-study}}")
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tracked-study")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(STAGES) and all(run.info.status == "FINISHED" for run in runs.values())
    pipeline = json.loads((run_dir / "pipeline.json").read_text())
    for stage in STAGES:
        run = runs[stage]
        spec = pipeline["pipeline"]["stages"][stage]
        assert run.data.tags["pipeline"] == "tracked" and run.data.tags["spec_hash"] == pipeline["hashes"][stage]
        assert run.data.params["kind"] == spec["kind"]
        result = json.loads((run_dir / stage / "result.json").read_text())
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert "result.json" in artifacts
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert run.data.metrics[f"result/{key}"] == pytest.approx(value), (stage, key)
    vlpt = runs["vlpt"]
    assert vlpt.data.params["train.steps"] == "4" and vlpt.data.params["init.from"] == "seed"
    assert vlpt.data.tags["arch"] == "specific" and vlpt.data.tags["k_seed"] == "3" and vlpt.data.tags["k_vl"] == "4"
    assert runs["merge"].data.tags["merge_knob"] == "alpha=0.75" and runs["merge"].data.tags["replicate_seeds"] == "4,4"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "vlpt" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/loss", "throughput/samples_per_s", "throughput/tflops_per_device"} <= set(tags)
    for tag in tags:  # every TensorBoard curve, the same steps and values (MFU too where the peak is known: GPUs)
        history = client.get_metric_history(vlpt.info.run_id, tag)
        assert [(p.step, p.value) for p in history] == [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(tag)], tag
    assert [p.step for p in client.get_metric_history(vlpt.info.run_id, "loss/loss")] == [1, 2, 3, 4]
    merged = {item.path for item in client.list_artifacts(runs["merge"].info.run_id)}
    assert "model.json" in merged and not any(path.endswith(".safetensors") for path in merged)


def test_missing_tracking_extra_is_one_paragraph(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if vlcluster[tracking] were not installed
    job = tmp_path / "job.yaml"
    job.write_text("name: t\ntracking: {wandb: {project: p, mode: offline}}\nstages:\n"
                   "  data: {kind: data, n_train: 8, n_val: 4, shard_size: 8, image_size: 16}\n")
    from vlcluster.context import StageContext, save_pipeline
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import SpecError, load_pipeline
    from vlcluster.tracking import stage_tracking

    graph = build_graph(load_pipeline(job), str(job))
    save_pipeline(tmp_path, graph)
    with pytest.raises(SpecError) as info, stage_tracking(StageContext(tmp_path, "data", graph)):
        pass
    message = " ".join(str(info.value).split())
    assert "tracking.wandb needs the optional package 'wandb'" in message and ".[tracking]" in message


def test_credentials_in_the_tracking_section_are_refused(write_job):
    from vlcluster.jobspec.load import SpecError, load_pipeline

    for text in ("wandb: {project: p, api_key: abc123secretvalue}",
                 "mlflow: {tracking_uri: 'https://bob:hunter2@mlflow.example.com'}"):
        path = write_job(f"name: t\ntracking: {{{text}}}\nstages:\n"
                         "  data: {kind: data, n_train: 8, n_val: 4, shard_size: 8, image_size: 16}\n")
        with pytest.raises(SpecError) as info:
            load_pipeline(path)
        assert "hunter2" not in str(info.value) and "abc123secretvalue" not in str(info.value)
