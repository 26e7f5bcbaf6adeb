"""The SLURM backend against a real one-node SLURM cluster with accounting
(tools/slurm-local): the shrunk quickstart as one job per stage chained by
afterok, a `scontrol requeue` and a submitit preemption signal mid-training
that both resume from a checkpoint, a failed stage whose dependants never
start, sweeps as job arrays, cancel."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import cli
from tests.support.jobs import BACKEND_SMALL as SMALL, BACKEND_STAGES as STAGES, FAILING
from tests.support.slurm import job_id, sacct_times, submit, wait_until_finished
from vlcluster.backends.slurm.jobs import job_states
from vlcluster.stages.rundir import read_json

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

# maa longer than in SMALL, so there is time to preempt it mid-run.
SLURM_SMALL = [*SMALL, "stages.maa.train.steps=24", "stages.maa.checkpoint.every=4"]


class Interrupter:
    """Once `stage` is running and has a checkpoint, do `action` to its job."""

    def __init__(self, run_dir: Path, stage: str, action: list[str]):
        self.run_dir, self.stage, self.action, self.at_step = run_dir, stage, action, None

    def __call__(self) -> None:
        if self.at_step is not None:
            return
        checkpoints = sorted((self.run_dir / self.stage / "checkpoints").glob("step_*[0-9]"))
        job = job_id(self.run_dir, self.stage)
        if checkpoints and job_states([job]).get(job) and job_states([job])[job].state == "RUNNING":
            subprocess.run([*self.action, job], check=True)
            self.at_step = int(checkpoints[-1].name.split("_")[1])


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory, backend_quickstart):
    run_dir = tmp_path_factory.mktemp("slurm-quickstart")
    started = time.perf_counter()
    result = submit(backend_quickstart, run_dir, *SLURM_SMALL)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stdout + result.stderr
    requeue = Interrupter(run_dir, "vlpt", ["scontrol", "requeue"])
    preempt = Interrupter(run_dir, "maa", ["scancel", "--signal=USR2"])  # what SLURM sends before the time limit
    states = wait_until_finished(run_dir, STAGES, timeout=900, on_poll=lambda: (requeue(), preempt()))
    return run_dir, result, elapsed, states, requeue, preempt


def test_submit_queues_every_stage_as_its_own_job_in_under_3_s(slurm_run):
    run_dir, result, elapsed, _, _, _ = slurm_run
    assert elapsed < 3, f"submit took {elapsed:.2f} s"
    ids = [job_id(run_dir, stage) for stage in STAGES]
    assert len(set(ids)) == len(STAGES)
    assert "all stages done" not in result.stdout and f"queued {len(STAGES)} stage(s)" in result.stdout
    script = (run_dir / "slurm" / "vlpt" / f"{job_id(run_dir, 'vlpt')}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{job_id(run_dir, 'seed')}:{job_id(run_dir, 'data')}" in script
    assert "#SBATCH --kill-on-invalid-dep=yes" in script


def test_every_job_completed_after_its_dependencies(slurm_run):
    from vlcluster.stages.context import load_graph

    run_dir, _, _, states, _, _ = slurm_run
    assert {state.state for state in states.values()} == {"COMPLETED"}
    graph = load_graph(run_dir)
    times = sacct_times([job_id(run_dir, stage) for stage in STAGES])
    for stage in STAGES:
        for dep in graph.deps[stage]:
            assert times[job_id(run_dir, stage)][0] >= times[job_id(run_dir, dep)][1], (stage, dep)
    assert "| merged |" in (run_dir / "table1" / "report.md").read_text()
    status = cli("status", str(run_dir)).stdout
    assert status.count(" done ") >= len(STAGES) and f"slurm {job_id(run_dir, 'vlpt')}" in status


@pytest.mark.parametrize("stage", ["vlpt", "maa"])
def test_interrupted_training_resumes_from_the_checkpoint_it_saved(slurm_run, stage):
    """vlpt: `scontrol requeue` (SIGTERM to the ranks); maa: submitit's USR2
    (the time-limit warning). Both save a checkpoint at the next step,
    requeue, and the requeued job resumes there instead of from step 0."""
    run_dir, _, _, states, requeue, preempt = slurm_run
    interrupted = {"vlpt": requeue, "maa": preempt}[stage]
    assert interrupted.at_step is not None, f"{stage} was never seen running with a checkpoint"
    log = cli("logs", str(run_dir), stage).stdout
    assert "stop requested: checkpoint at step" in log
    saved = int(re.search(r"stop requested: checkpoint at step (\d+)", log).group(1))
    assert f"resuming from checkpoint step_{saved:08d}" in log
    assert saved >= interrupted.at_step
    assert "(restart 1)" in log
    assert states[job_id(run_dir, stage)].restarts >= 1
    assert (run_dir / stage / "_SUCCESS").is_file()


def test_resubmit_of_a_finished_run_queues_nothing(slurm_run, backend_quickstart):
    run_dir, _, _, _, _, _ = slurm_run
    again = submit(backend_quickstart, run_dir, *SLURM_SMALL)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped (done)") == len(STAGES) and "queued 0 stage(s)" in again.stdout


def test_failed_stage_leaves_dependants_unstarted_and_status_names_it(write_job, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per stage, log paths unwrapped
    run_dir = tmp_path / "run"
    result = submit(str(write_job(FAILING)), run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    states = wait_until_finished(run_dir, ("data", "seed", "vqa_on_pretrained", "table"), timeout=300)
    assert states[job_id(run_dir, "vqa_on_pretrained")].state == "FAILED"
    assert states[job_id(run_dir, "table")].state == "CANCELLED"
    assert sacct_times([job_id(run_dir, "table")])[job_id(run_dir, "table")][0] in {"None", "Unknown"}  # never started
    status = cli("status", str(run_dir)).stdout
    row = next(line for line in status.splitlines() if "vqa_on_pretrained" in line and "table" not in line)
    assert "failed" in row and f"log {run_dir / 'vqa_on_pretrained' / 'logs' / 'stage.log'}" in row
    assert "upstream failed: vqa_on_pretrained" in status
    assert "no VQA head" in cli("logs", str(run_dir), "vqa_on_pretrained").stdout


SWEEP = """
name: sweep
stages:
  data: {kind: data, n_train: 32, n_val: 8, shard_size: 16, sweep: {seed: [0, 1, 2]}}
  after_all: {kind: data, n_train: 16, n_val: 8, shard_size: 16, after: [data]}
"""


def test_sweep_is_one_job_array_and_downstream_waits_for_all(write_job, tmp_path):
    run_dir = tmp_path / "run"
    result = submit(str(write_job(SWEEP)), run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    elements = [f"data[seed={seed}]" for seed in range(3)]
    ids = [job_id(run_dir, element) for element in elements]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{index}" for index in range(3)]
    states = wait_until_finished(run_dir, [*elements, "after_all"], timeout=300)
    assert {state.state for state in states.values()} == {"COMPLETED"}
    script = (run_dir / "slurm" / "after_all" / f"{job_id(run_dir, 'after_all')}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{array}\n" in script
    times = sacct_times([*ids, job_id(run_dir, "after_all")])
    assert times[job_id(run_dir, "after_all")][0] >= max(times[i][1] for i in ids)
    assert all((run_dir / element / "_SUCCESS").is_file() for element in elements)


def test_local_backend_runs_the_same_sweep(write_job, tmp_path):
    result = cli("submit", str(write_job(SWEEP)), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert all((tmp_path / "run" / f"data[seed={seed}]" / "_SUCCESS").is_file() for seed in range(3))


def test_cancel_cancels_every_queued_job(write_job, tmp_path):
    run_dir = tmp_path / "run"
    result = submit(str(write_job(SWEEP)), run_dir)
    assert result.returncode == 0, result.stderr
    cancelled = cli("cancel", str(run_dir))
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    states = wait_until_finished(run_dir, ["data[seed=0]", "after_all"], timeout=60)
    assert states[job_id(run_dir, "after_all")].state == "CANCELLED"
    assert "cancelled" in cli("status", str(run_dir)).stdout


def test_gated_merge_shows_gated_and_blocks_its_dependants_on_slurm(write_job, tmp_path, monkeypatch):
    from tests.support.jobs import GATED, assert_gated_status

    monkeypatch.setenv("COLUMNS", "400")
    run_dir = tmp_path / "run"
    result = submit(str(write_job(GATED)), run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    states = wait_until_finished(run_dir, ("data", "vlpt", "merge", "after_merge"), timeout=300)
    assert states[job_id(run_dir, "merge")].state == "FAILED"
    assert states[job_id(run_dir, "after_merge")].state == "CANCELLED"  # --kill-on-invalid-dep: never started
    assert_gated_status(run_dir)


# A pipeline sweep: each copy of `specific` reads the data copy of its own element.
ZIPPED = """
name: zipped
sweep:
  zip:
    stages.data.seed: [0, 1]
    stages.specific.train.seed: [0, 1]
stages:
  data: {kind: data, n_train: 16, n_val: 8, shard_size: 16}
  specific:
    kind: pretrain
    model: {arch: specific}
    data: {from: data}
    train: {steps: 0, batch_size: 8}
    resources: {procs_per_node: 1}
  one_task: {kind: data, n_train: 16, n_val: 8, shard_size: 16, after: ["data[data.seed=1]"]}
"""


def test_zipped_copies_are_arrays_each_task_after_its_own_element(write_job, tmp_path):
    """aftercorr on a real SLURM: task i of the `specific` array starts after
    task i of the `data` array; a job after one element waits for that task
    only (afterok:<array>_<task>); 0 steps write the initial weights (every
    expert the same, as a K_seed = 0 model starts)."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    result = submit(str(write_job(ZIPPED)), run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    data = ["data[data.seed=0]", "data[data.seed=1]"]
    specific = ["specific[data.seed=0,specific.train.seed=0]", "specific[data.seed=1,specific.train.seed=1]"]
    states = wait_until_finished(run_dir, [*data, *specific, "one_task"], timeout=300)
    assert {state.state for state in states.values()} == {"COMPLETED"}
    data_ids, specific_ids = [job_id(run_dir, s) for s in data], [job_id(run_dir, s) for s in specific]
    script = (run_dir / "slurm" / "specific" / f"{specific_ids[0].split('_')[0]}_submission.sh").read_text()
    assert f"#SBATCH --dependency=aftercorr:{data_ids[0].split('_')[0]}\n" in script
    script = (run_dir / "slurm" / "one_task" / f"{job_id(run_dir, 'one_task')}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{data_ids[1]}\n" in script
    times = sacct_times([*data_ids, *specific_ids, job_id(run_dir, "one_task")])
    for data_id, specific_id in zip(data_ids, specific_ids):
        assert times[specific_id][0] >= times[data_id][1]
    assert times[job_id(run_dir, "one_task")][0] >= times[data_ids[1]][1]
    weights = [load_file(run_dir / name / "model.safetensors") for name in specific]
    for state in weights:
        experts = {key: tensor for key, tensor in state.items() if ".v." in key}
        assert experts and all(torch_equal(tensor, state[key.replace(".v.", ".l.")]) for key, tensor in experts.items())
    assert not torch_equal(weights[0]["layers.0.attn.v.qkv.weight"], weights[1]["layers.0.attn.v.qkv.weight"])
    assert read_json(run_dir / specific[0] / "result.json")["steps"] == 0


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
