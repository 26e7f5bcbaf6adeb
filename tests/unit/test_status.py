"""The rules of `vlcluster status` that hold on every backend (gated,
blocked, progress), over records in the format the backends write."""

from __future__ import annotations

from vlcluster.backends.run_status import run_status
from vlcluster.graph import build_graph
from vlcluster.jobspec.load import load_pipeline
from vlcluster.plan import make_plan
from vlcluster.stages.progress import describe_progress, read_progress, write_progress
from vlcluster.stages.rundir import stage_dir

JOB = """
name: rules
stages:
  data: {kind: data}
  vlpt: {kind: pretrain, model: {arch: specific}, data: {from: data}, train: {steps: 10, batch_size: 4}}
  merge: {kind: merge, source: vlpt, gate: {metric: ssd, max: 0.0}}
  after_merge: {kind: data, after: [merge]}
  last: {kind: data, after: [after_merge]}
"""


def statuses(write_job, tmp_path, records: dict[str, dict]):
    path = write_job(JOB)
    graph = build_graph(load_pipeline(str(path), []), str(path))
    run_dir = tmp_path / "run"
    for name, record in records.items():
        stage_dir(run_dir, name).write_state(**record)
    stage_dir(run_dir, "data").mark_done(graph.hashes["data"])
    plans = make_plan(graph, run_dir)
    return run_status(graph, plans, {p.name: stage_dir(run_dir, p.name).read_state() for p in plans}, run_dir), run_dir


def test_a_closed_gate_is_gated_and_everything_after_it_blocked(write_job, tmp_path):
    found, _ = statuses(write_job, tmp_path, {
        "vlpt": {"backend": "local", "state": "done", "returncode": 0},
        "merge": {"backend": "local", "state": "failed", "returncode": 3, "reason": "mergeability gate closed: ssd 2 > max 0",
                  "gate": {"metric": "ssd", "value": 2.0, "max": 0.0, "passed": False}},
        "after_merge": {"backend": "local", "state": "blocked", "blocked_by": ["merge"]},
    })
    assert found["data"].state == "done"
    assert found["merge"].state == "gated" and "mergeability gate closed" in found["merge"].detail
    assert (found["after_merge"].state, found["after_merge"].detail) == ("blocked", "upstream gated: merge")
    assert (found["last"].state, found["last"].detail) == ("blocked", "upstream blocked: after_merge")


def test_a_failed_merge_with_an_open_gate_is_failed_and_a_recovered_upstream_unblocks(write_job, tmp_path):
    found, _ = statuses(write_job, tmp_path, {
        "merge": {"backend": "local", "state": "failed", "returncode": 1, "gate": {"passed": True}},
        "after_merge": {"backend": "local", "state": "blocked", "blocked_by": ["merge"]},
    })
    assert found["merge"].state == "failed" and "exit 1" in found["merge"].detail
    assert found["after_merge"].state == "blocked"
    found, _ = statuses(write_job, tmp_path, {"merge": {"backend": "local", "state": "running", "pid": 0}})
    assert found["merge"].state == "interrupted"  # no live process behind a "running" record
    assert found["after_merge"].state == "pending"  # recorded blocked, but its upstream is no longer failed


def test_progress_record_is_shown_for_a_running_stage(write_job, tmp_path):
    import os

    from vlcluster.backends.stage_process import process_start

    me = {"backend": "local", "state": "running", "pid": os.getpid(), "pid_start": process_start(os.getpid())}
    found, run_dir = statuses(write_job, tmp_path, {"vlpt": me})
    assert found["vlpt"].state == "running" and found["vlpt"].detail == ""
    write_progress(stage_dir(run_dir, "vlpt"), 4, 10, loss=2.5, samples_per_s=8.0, samples_per_step=4, checkpoint_step=2)
    record = read_progress(stage_dir(run_dir, "vlpt"))
    assert record["eta_s"] == 3.0  # 6 steps x 4 samples at 8 samples/s
    assert describe_progress(record) == "step 4/10, loss 2.500, 8 samples/s, ETA 0m03s, checkpoint step 2"
    found, _ = statuses(write_job, tmp_path, {"vlpt": me})
    assert found["vlpt"].detail == "step 4/10, loss 2.500, 8 samples/s, ETA 0m03s, checkpoint step 2"


def test_a_stage_without_log_steps_reports_progress_as_it_goes(tmp_path):
    from vlcluster.stages.progress import reported

    directory = stage_dir(tmp_path, "grams")
    seen = []
    for batch in reported(iter(["b0", "b1", "b2"]), directory, total=3, samples_per_step=16, every_s=0):
        seen.append(batch)
        assert (read_progress(directory) or {}).get("step", 0) == len(seen) - 1  # written after each step
    record = read_progress(directory)
    assert seen == ["b0", "b1", "b2"] and (record["step"], record["steps"]) == (3, 3) and record["samples_per_s"] > 0


def test_cancel_signals_only_the_process_the_record_names(write_job, tmp_path):
    """A pid in state.json is signalled only while it is still the recorded
    process: a live process with another start time (a reused pid) or an
    unrelated command line (a planted pid) is left alone."""
    import subprocess
    import sys

    from vlcluster.backends.local import LocalBackend
    from vlcluster.backends.stage_process import process_start

    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    victim = subprocess.Popen(command)
    try:
        backend = LocalBackend.__new__(LocalBackend)
        running = {"backend": "local", "state": "running", "pid": victim.pid}
        reused = {**running, "pid_start": process_start(victim.pid) + 1}
        planted = {**running, "command": ["python", "-m", "vlcluster.run", "run", "stage"]}
        assert backend.cancel(tmp_path, {"a": reused, "b": planted, "c": {**running, "pid": 2**70}}) == []
        assert victim.poll() is None  # still alive: nothing was signalled
        found, _ = statuses(write_job, tmp_path, {"vlpt": reused})
        assert found["vlpt"].state == "interrupted"  # not reported as running either
        ours = {**running, "pid_start": process_start(victim.pid), "command": command}
        assert backend.cancel(tmp_path, {"vlpt": ours}) == ["vlpt"]
        assert victim.wait(timeout=10) != 0
    finally:
        victim.kill()


def test_slurm_logs_read_only_submitit_logs_of_this_run(tmp_path):
    """`vlcluster logs` prints the submitit log a record names only when it
    lies in the run's own slurm folder: a record pointing elsewhere prints nothing of it."""
    from vlcluster.backends.slurm.backend import SlurmBackend

    run_dir = tmp_path / "run"
    inside = run_dir / "slurm" / "seed" / "42_0_log.out"
    inside.parent.mkdir(parents=True)
    inside.write_text("submitit says hello\n")
    secret = tmp_path / "secret_log.out"
    secret.write_text("not yours\n")
    assert SlurmBackend.job_log(run_dir, {"slurm_log": str(inside)}) == inside.resolve()
    for hostile in (str(secret), str(run_dir / "slurm" / ".." / ".." / "secret_log.out"), "/etc/passwd", ["x"], None):
        assert SlurmBackend.job_log(run_dir, {"slurm_log": hostile}) is None


def test_status_shows_each_stages_time_from_its_record_and_a_dash_for_a_garbled_one(write_job, tmp_path):
    """The `time` column and `duration_s` of `status --json`: the last attempt's
    ended - started; a record with no, mistyped, backwards or unreadable times
    shows "–" (null), and the command still exits 0."""
    import json

    from tests.support.cli import cli
    from vlcluster.graph import build_graph
    from vlcluster.stages.context import save_pipeline

    path = write_job(JOB)
    run_dir = tmp_path / "run"
    graph = build_graph(load_pipeline(str(path), []), str(path))
    save_pipeline(run_dir, graph)
    stage_dir(run_dir, "data").mark_done(graph.hashes["data"])
    stage_dir(run_dir, "data").write_state(backend="local", state="done", started=100.0, ended=112.5)
    stage_dir(run_dir, "vlpt").write_state(backend="local", state="failed", returncode=1, started=1000, ended=1543)
    for stage, text in {
        "merge": json.dumps({"backend": "local", "state": "failed", "returncode": 1, "started": "yesterday", "ended": [1]}),
        "after_merge": '{"state": "failed", "started": 1e308, "ended": -1e308',  # cut off: not JSON
        "last": json.dumps({"backend": "local", "state": "failed", "returncode": 1, "started": -1e308, "ended": 1e308}),
    }.items():
        stage_dir(run_dir, stage).root.mkdir()
        stage_dir(run_dir, stage).state_file.write_text(text)

    status = cli("status", str(run_dir), env={"COLUMNS": "200"}, timeout=60)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    header = next(line for line in status.stdout.splitlines() if "┃ stage" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["stage", "kind", "job", "state", "time", "detail"]
    rows = {cells[0]: cells for line in status.stdout.splitlines() if line.count("│") > 3
            for cells in [[cell.strip() for cell in line.split("│")[1:-1]]]}
    assert {stage: cells[3:5] for stage, cells in rows.items()} == {
        "data": ["done", "12.5 s"], "vlpt": ["failed", "9 min 3 s"], "merge": ["failed", "–"],
        "after_merge": ["blocked", "–"], "last": ["failed", "–"]}

    record = json.loads(cli("status", str(run_dir), "--json", timeout=60).stdout)
    assert {stage["name"]: stage["duration_s"] for stage in record["stages"]} == {
        "data": 12.5, "vlpt": 543.0, "merge": None, "after_merge": None, "last": None}
    assert set(record["stages"][0]) == {"name", "kind", "job", "state", "detail", "duration_s"}  # the fields before, and one more


def test_times_are_printed_in_the_unit_a_reader_expects():
    from vlcluster.run_times import format_seconds

    assert [format_seconds(seconds) for seconds in (None, 0.04, 12.34, 59.96, 543.4, 3599.6, 7530)] == [
        "–", "0.0 s", "12.3 s", "1 min 0 s", "9 min 3 s", "1 h 0 min", "2 h 5 min"]
