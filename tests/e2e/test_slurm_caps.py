"""The caps on the real one-node SLURM cluster (tools/slurm-local, 2 CPUs, no
GPU), with squeue sampled every second while the jobs run:

- ``resources.max_concurrent`` is the array's throttle: a 6-element sweep with
  ``max_concurrent: 1`` never has two tasks running (the node has room for two,
  and a sweep without it does run two at once: the sampling sees it);
- ``limits.gpus``: GPUs cannot be requested on this node, so each GPU is counted
  as a CPU (the sbatch line asks for CPUs instead; the dependencies are shaped
  from the GPUs the spec names): three independent 1-GPU stages under
  ``limits.gpus: 1`` never overlap;
- ``status --watch`` and ``logs -f`` follow a SLURM run to its end.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.slurm import job_id, sacct_times, wait_until_finished
from vlcluster.backends.slurm import backend as slurm_backend

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]

# squeue lists every user's jobs: a pipeline name of this process's own keeps another
# checkout's tests on the same cluster out of the samples
TAG = f"p{os.getpid()}"

SWEEP = """
name: {name}
stages:
  data: {{kind: data, n_train: 16, n_val: 8, shard_size: 16, sweep: {{seed: {seeds}}}{throttle}}}
"""


class RunningSampler:
    """The jobs of one pipeline running at each second (``squeue -t R``), by job name."""

    def __init__(self, pipeline: str):
        self.pipeline, self.samples, self._stop = pipeline, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i %j"], capture_output=True, text=True).stdout
            self.samples.append([line.split()[0] for line in out.splitlines() if line.split()[1].startswith(self.pipeline + ".")])
            self._stop.wait(1.0)

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def most(self) -> int:
        return max(map(len, self.samples), default=0)


def submit_sweep(write_job, run_dir: Path, name: str, elements: int, throttle: str) -> list[str]:
    from tests.support.slurm import submit

    text = SWEEP.format(name=name, seeds=list(range(elements)), throttle=throttle)
    result = submit(str(write_job(text, f"{name}.yaml")), run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return [f"data[seed={seed}]" for seed in range(elements)]


def test_max_concurrent_is_the_array_throttle_on_a_real_cluster(write_job, tmp_path):
    started = time.monotonic()
    with RunningSampler(f"throttled{TAG}") as throttled:
        elements = submit_sweep(write_job, tmp_path / "throttled", f"throttled{TAG}", 6, ", resources: {max_concurrent: 1}")
        states = wait_until_finished(tmp_path / "throttled", elements, timeout=120)
    assert {state.state for state in states.values()} == {"COMPLETED"}
    assert "--array=0-5%1" in next((tmp_path / "throttled" / "slurm" / "data").glob("*_submission.sh")).read_text()
    assert throttled.most == 1, throttled.samples
    with RunningSampler(f"free{TAG}") as free:
        elements = submit_sweep(write_job, tmp_path / "free", f"free{TAG}", 2, "")
        wait_until_finished(tmp_path / "free", elements, timeout=120)
    assert free.most == 2, free.samples  # without the throttle both CPUs of the node are used
    assert time.monotonic() - started < 120


CAPPED = """
name: gpucap{tag}
limits: {gpus: 1}
stages:
  a: {kind: data, n_train: 16, n_val: 8, shard_size: 16, seed: 1, resources: {gpus_per_node: 1, profile: fakegpu}}
  b: {kind: data, n_train: 16, n_val: 8, shard_size: 16, seed: 2, resources: {gpus_per_node: 1, profile: fakegpu}}
  c: {kind: data, n_train: 16, n_val: 8, shard_size: 16, seed: 3, resources: {gpus_per_node: 1, profile: fakegpu}}
"""


def gpus_as_cpus(parameters):
    """sbatch parameters that ask for a CPU per GPU instead (the node has no GRES)."""

    def wrapped(spec, profile, job_name):
        params = parameters(spec, profile, job_name)
        params["cpus_per_task"] = int(str(params.pop("gpus_per_node", 1)).split(":")[-1])
        return params

    return wrapped


def test_limits_gpus_never_runs_more_stages_than_the_cap_allows(write_job, tmp_path, monkeypatch):
    from rich.console import Console

    from vlcluster.stages.context import save_pipeline
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import load_pipeline
    from vlcluster.plan import make_plan

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "fakegpu.yaml").write_text("partition: debug\ngpus_per_node: 2\ntime_min: 10\nsignal_delay_s: 10\n")
    monkeypatch.setenv("VLCLUSTER_PROFILE_PATH", str(profiles))
    monkeypatch.setattr(slurm_backend, "sbatch_parameters", gpus_as_cpus(slurm_backend.sbatch_parameters))
    graph = build_graph(load_pipeline(write_job(CAPPED.replace("{tag}", TAG))))
    run_dir = tmp_path / "run"
    backend = slurm_backend.SlurmBackend(Console(quiet=True))
    backend.validate(graph, f"gpucap{TAG}")
    save_pipeline(run_dir, graph)
    with RunningSampler(f"gpucap{TAG}") as sampler:
        assert backend.submit(graph, make_plan(graph, run_dir), run_dir)
        states = wait_until_finished(run_dir, ["a", "b", "c"], timeout=120)
    assert {state.state for state in states.values()} == {"COMPLETED"}
    assert sampler.most == 1, sampler.samples  # two CPUs free, but one "GPU" allowed
    script = next((run_dir / "slurm" / "c").glob("*_submission.sh")).read_text()
    assert f"afterany:{job_id(run_dir, 'b')}" in script and "--gpus" not in script
    times = sacct_times([job_id(run_dir, stage) for stage in "abc"])
    spans = sorted(times.values())
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # one after another


def test_status_watch_and_logs_follow_a_slurm_run_to_its_end(write_job, tmp_path):
    from tests.support.watch import CHAIN, vlcluster, watch_while_running

    run_dir = tmp_path / "run"
    submit = vlcluster("submit", str(write_job(CHAIN)), "--backend", "slurm", "--run-dir", str(run_dir))
    docs, followed, code = watch_while_running(run_dir, submit, "second")
    assert submit.wait(timeout=60) == 0
    assert docs[-1]["ended"] and [stage["state"] for stage in docs[-1]["stages"]] == ["done", "done"]
    assert all(stage["job"].startswith("slurm ") for stage in docs[-1]["stages"])
    assert code == 0 and followed == (run_dir / "second" / "logs" / "stage.log").read_text() and "slurm job" in followed
