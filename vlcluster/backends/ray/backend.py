"""Ray backend: every stage one Ray job (Jobs API), started by this driver as
soon as the stages it depends on are done, so independent stages (seed
pre-training and the MAA reference, the three fine-tunings, the evals) run
side by side as far as the cluster's resources allow.

- ``--address ADDR`` joins a running cluster (``auto``, the GCS
  ``host:port`` or the dashboard ``http://host:8265``, as ``ray job submit``
  takes them); without it a private one-node cluster is started on
  127.0.0.1 for the run and stopped at its end (``local_cluster.py``).
- Each job runs ``python -m vlcluster.backends.ray.stage RUN_DIR STAGE`` and
  reserves the stage's CPUs and GPUs as entrypoint resources; Ray starts it
  when a node has them free. The job's metadata names the run and the stage,
  and its log, on the dashboard, shows the trainer's step, loss and
  throughput lines (also parsed into ``state.json`` for ``vlcluster status``).
- Training runs under torchrun inside the job, exactly as on the local and
  SLURM backends, not under Ray Train's ``TorchTrainer``: the same entry
  point, checkpoint format and resume path serve every backend; the
  trainer's exit handling (``os._exit`` after leaving the process group,
  see ``train/dist.py``) would take a Ray Train worker actor down with it;
  and the rendezvous stays under vlcluster's control: torchrun's
  ``--standalone`` rendezvous on the job's own node, on the loopback
  interface. Ray Train would set ``MASTER_ADDR`` to the node IP Ray reports,
  which Ray takes from the host's primary interface even on a head started
  with ``--node-ip-address=127.0.0.1``.
- Fault tolerance (``stage.py``): a rank killed mid-training makes the
  job start the stage's torchrun again (``--max-restarts``, default 3), and
  the trainer resumes from the stage's latest checkpoint under its run dir.
- ``limits.gpus`` and ``resources.max_concurrent``: a ready stage starts only
  while the GPUs of the running stages and its own stay within the cap, and
  fewer than ``max_concurrent`` elements of its sweep run (``admitted``).
- A failed or cancelled stage's dependants are never submitted (state
  ``blocked``). ``submit`` returns when every stage has ended, like the local
  backend (a KubeRay RayJob's entrypoint is this driver); interrupting it
  stops the jobs it started.
- A stage with ``resources.nodes > 1`` runs one torchrun per node from its
  job, each in a bundle of a STRICT_SPREAD placement group (``multi_node.py``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vlcluster.backends.contract import StageStatus
from vlcluster.backends.node_shape import node_shape
from vlcluster.backends.ray.jobs import describe_job, job_statuses, ray_records
from vlcluster.backends.ray.multi_node import MASTER_ADDR_ENV
from vlcluster.backends.ray.stage import DEFAULT_MAX_RESTARTS
from vlcluster.backends.run_lock import run_lock
from vlcluster.extras import require
from vlcluster.graph import Graph
from vlcluster.jobspec.sweep import sweep_base
from vlcluster.launch import is_distributed
from vlcluster.plan import StagePlan
from vlcluster.stages.progress import describe_progress, read_progress
from vlcluster.stages.rundir import stage_dir, write_json_atomic
from vlcluster.errors import SpecError
from vlcluster.storage.config import ENV as STORAGE_ENV

POLL_S = 1.0
FAILED = frozenset({"failed", "cancelled", "blocked"})


def submission_id(pipeline: str, stage: str, unique: str | None = None) -> str:
    """Unique per submit (a resumed stage is a new job); readable on the dashboard."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", f"{pipeline}-{stage}").strip("_")
    return f"vlcluster-{readable}-{unique or uuid.uuid4().hex[:8]}"


def admitted(graph: Graph, name: str, running: Iterable[str]) -> bool:
    """Whether a ready stage may start beside the running ones: ``limits.gpus`` over all of
    them and ``resources.max_concurrent`` over its family (the elements of its sweep)."""
    stages = graph.pipeline.stages

    def gpus(stage: str) -> int:
        return stages[stage].resources.nodes * stages[stage].resources.gpus_per_node

    cap = graph.pipeline.limits.gpus
    running = list(running)
    if cap and gpus(name) and gpus(name) + sum(gpus(other) for other in running) > cap:
        return False
    limit = stages[name].resources.max_concurrent
    return not limit or sum(sweep_base(other) == sweep_base(name) for other in running) < limit


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


@dataclass
class Launched:
    plan: StagePlan
    job_id: str
    prefix: str
    started: float
    progress_shown: str = ""
    running: bool = False


class RayBackend:
    name = "ray"
    queues = False  # submit drives the pipeline until every stage has ended
    rendered_file = "ray-jobs.yaml"

    def __init__(self, console: Console | None = None, address: str | None = None,
                 max_restarts: int = DEFAULT_MAX_RESTARTS):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.address = address
        self.max_restarts = max_restarts

    def validate(self, graph: Graph, source: str) -> None:
        from vlcluster.backends.gpu_cap import cap_shape

        cap_shape(graph, list(graph.order), None, source)  # a stage larger than limits.gpus would never start
        """Any stage fits: resources are checked by Ray when it places the job."""
        require("ray.job_submission", "--backend ray")

    # ---- the cluster ---------------------------------------------------------

    @contextmanager
    def cluster(self, run_dir: Path) -> Iterator[str]:
        """The dashboard URL of the cluster the run uses."""
        if self.address:
            from ray.dashboard.utils import get_address_for_submission_client
            from ray.exceptions import RayError

            try:
                url = get_address_for_submission_client(self.address)
            except (ConnectionError, ValueError, RuntimeError, RayError) as exc:
                raise SpecError(f"--address {self.address}: no Ray cluster found there ({exc})") from None
            yield url
            return
        from vlcluster.backends.ray.local_cluster import LocalRayCluster

        log = run_dir / "ray" / "head.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.console.print("starting a local Ray cluster for this run (pass --address to use a running one)")
        with LocalRayCluster(log=log) as local:
            yield local.dashboard_url

    # ---- one job ---------------------------------------------------------------

    def entrypoint(self, run_dir: Path, plan: StagePlan) -> str:
        return shlex.join([
            sys.executable, "-m", "vlcluster.backends.ray.stage", str(run_dir), plan.name,
            f"--max-restarts={self.max_restarts}", f"--workdir={os.getcwd()}",
        ])

    @staticmethod
    def entrypoint_resources(graph: Graph, plan: StagePlan) -> dict:
        res = graph.pipeline.stages[plan.name].resources
        if res.nodes > 1:  # the job only drives one task per node; the tasks hold the resources
            return {"entrypoint_num_cpus": 0, "entrypoint_num_gpus": 0}
        shape = node_shape(res, plan.kind)  # Ray has no site defaults: what the stage asks for
        return {"entrypoint_num_cpus": shape.cpus, "entrypoint_num_gpus": shape.gpus}

    @staticmethod
    def job_env() -> dict[str, str]:
        # Ray's stop sends SIGTERM, then SIGKILL after this long: time for the ranks to checkpoint.
        env = {"RAY_JOB_STOP_WAIT_TIME_S": "60"}
        # Storage settings (endpoint, region, cache; never credentials, which the
        # dashboard would show with the job) so stages can reach an s3:// run dir.
        for name in (MASTER_ADDR_ENV, STORAGE_ENV):
            if os.environ.get(name):
                env[name] = os.environ[name]
        return env

    def job_request(self, graph: Graph, plan: StagePlan, run_dir: Path, job_id: str) -> dict:
        """The keyword arguments of ``JobSubmissionClient.submit_job`` for one stage."""
        return {
            "entrypoint": self.entrypoint(run_dir, plan),
            "submission_id": job_id,
            "metadata": {"vlcluster_run": str(run_dir), "pipeline": graph.pipeline.name, "stage": plan.name, "kind": plan.kind},
            "runtime_env": {"env_vars": self.job_env()},
            **self.entrypoint_resources(graph, plan),
        }

    def launch(self, client, graph: Graph, plan: StagePlan, run_dir: Path, address: str, prefix: str) -> Launched:
        job_id = submission_id(graph.pipeline.name, plan.name)
        directory = stage_dir(run_dir, plan.name)
        # Recorded before the job exists, so the job's own state updates always land on this record.
        write_json_atomic(directory.state_file, {
            "backend": "ray", "state": "submitted", "job_id": job_id, "address": address,
            "submitted": time.time(), "log": str(directory.log_file), "spec_hash": plan.spec_hash,
        })
        client.submit_job(**self.job_request(graph, plan, run_dir, job_id))
        how = f"torchrun x{plan.ranks}" if is_distributed(plan.kind) else "python"
        self.console.print(f"[bold]{prefix}[/] ({plan.kind}, {how}): {plan.describe()} -> Ray job {job_id}")
        return Launched(plan, job_id, prefix, time.time())

    def follow(self, client, job: Launched, run_dir: Path) -> str | None:
        """Print what changed; the stage's outcome once its job has ended."""
        from ray.job_submission import JobStatus

        status = client.get_job_status(job.job_id)
        directory = stage_dir(run_dir, job.plan.name)
        if status == JobStatus.RUNNING and not job.running:
            job.running = True
            self.console.print(f"  [dim]{escape(job.plan.name)}: running[/]")
        record = directory.read_state()
        shown = describe_progress(read_progress(directory))
        if shown and shown != job.progress_shown:
            job.progress_shown = shown
            restarts = f" (workers restarted {record['worker_restarts']}x)" if record.get("worker_restarts") else ""
            self.console.print(f"  [dim]{escape(job.plan.name)}: {shown}{restarts}[/]")
        if not status.is_terminal():
            return None
        elapsed = time.time() - job.started
        if status == JobStatus.SUCCEEDED and directory.done_hash() == job.plan.spec_hash:
            directory.write_state(state="done", ended=time.time())
            self.console.print(f"[green]{job.prefix}: done in {elapsed:.1f} s[/]")
            return "done"
        info = client.get_job_info(job.job_id)
        state = "cancelled" if status == JobStatus.STOPPED else "failed"
        # Ray's message ends with the job's last log lines: its first line is what status shows.
        message = (info.message or "").split(",", 1)[0].split("\n", 1)[0]
        directory.write_state(state=state, returncode=info.driver_exit_code, ended=time.time(), ray_message=message)
        self.console.print(f"[red]{job.prefix}: {state} ({message}) after {elapsed:.1f} s; log: {directory.log_file}[/]")
        return state

    # ---- the pipeline ------------------------------------------------------------

    def submit(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> bool:
        run_dir = run_dir.resolve()
        # A stopped RayJob sends its driver SIGTERM: unwind like Ctrl-C, stopping the stage jobs.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            with run_lock(run_dir), self.cluster(run_dir) as address:
                return self.run(graph, plans, run_dir, address)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def run(self, graph: Graph, plans: list[StagePlan], run_dir: Path, address: str) -> bool:
        from ray.job_submission import JobSubmissionClient

        self.console.print(f"Ray dashboard: [bold]{address}[/] (jobs vlcluster-{graph.pipeline.name}-*)")
        try:
            client = JobSubmissionClient(address)
        except ConnectionError as exc:
            raise SpecError(f"Ray dashboard {address} does not answer ({exc})") from None
        numbers = {plan.name: escape(f"[{index}/{len(plans)}] {plan.name}") for index, plan in enumerate(plans, start=1)}
        adopted = self.adopt_running(client, run_dir, plans, numbers)
        return self.schedule(client, graph, plans, run_dir, address, numbers, adopted)

    def schedule(self, client, graph: Graph, plans: list[StagePlan], run_dir: Path, address: str,
                 numbers: dict[str, str], adopted: dict[str, Launched]) -> bool:
        outcome = {plan.name: "done" for plan in plans if not plan.runs}
        for plan in plans:
            if not plan.runs:
                self.console.print(f"[dim]{numbers[plan.name]}: skipped (done)[/]")
        waiting = [plan for plan in plans if plan.runs and plan.name not in adopted]
        running: dict[str, Launched] = dict(adopted)
        try:
            while waiting or running:
                for plan in list(waiting):
                    deps = graph.deps[plan.name]
                    blocked = sorted(dep for dep in deps if outcome.get(dep) in FAILED)
                    if blocked:
                        waiting.remove(plan)
                        outcome[plan.name] = "blocked"
                        stage_dir(run_dir, plan.name).write_state(backend="ray", state="blocked", blocked_by=blocked)
                        self.console.print(f"[yellow]{numbers[plan.name]}: not started, upstream failed: {', '.join(blocked)}[/]")
                    elif all(outcome.get(dep) == "done" for dep in deps) and admitted(graph, plan.name, running):
                        waiting.remove(plan)
                        running[plan.name] = self.launch(client, graph, plan, run_dir, address, numbers[plan.name])
                for name, job in list(running.items()):
                    ended = self.follow(client, job, run_dir)
                    if ended is not None:
                        outcome[name] = ended
                        del running[name]
                if waiting or running:
                    time.sleep(POLL_S)
        except BaseException:
            self.stop(client, running.values(), run_dir)  # Ctrl-C / SIGTERM of the driver: its jobs go too
            raise
        return all(state == "done" for state in outcome.values())

    def stop(self, client, jobs, run_dir: Path) -> None:
        for job in jobs:
            try:
                client.stop_job(job.job_id)
            except RuntimeError:
                continue  # already ended
            stage_dir(run_dir, job.plan.name).write_state(state="cancelled", cancelled=time.time())
            self.console.print(f"[yellow]{job.prefix}: stopped Ray job {job.job_id}[/]")

    def adopt_running(self, client, run_dir: Path, plans: list[StagePlan], numbers: dict[str, str]) -> dict[str, Launched]:
        """Jobs an earlier submit started that still run (its driver was killed):
        followed, not started twice, when they run the spec this submit asks
        for; a job of another spec would write the same checkpoints, so the
        submit is refused until it ends or is cancelled."""
        from vlcluster.backends.ray.jobs import active_jobs

        records = {plan.name: stage_dir(run_dir, plan.name).read_state() for plan in plans if plan.runs}
        active = active_jobs(client, records)
        by_name = {plan.name: plan for plan in plans}
        foreign = {name: job_id for name, job_id in active.items() if records[name].get("spec_hash") != by_name[name].spec_hash}
        if foreign:
            listed = ", ".join(f"{name} (job {job_id})" for name, job_id in foreign.items())
            raise SpecError(f"{run_dir}: Ray jobs of an earlier submit of this run are still running another spec of "
                            f"their stage: {listed}; wait, or `vlcluster cancel {run_dir}` first")
        adopted = {}
        for name, job_id in active.items():
            started = records[name].get("submitted")
            adopted[name] = Launched(by_name[name], job_id, numbers[name], started if isinstance(started, (int, float)) else time.time())
            self.console.print(f"[bold]{numbers[name]}[/]: following Ray job {job_id}, started by an earlier submit")
        return adopted

    # ---- what status, logs and cancel ask ---------------------------------------

    def render(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> str:
        """The Jobs API submissions submit would make (``submit_job`` keyword arguments), in order."""
        import yaml

        run_dir = run_dir.resolve()  # as submit does
        jobs = [{"stage": plan.name, "starts_after": list(graph.deps[plan.name]),
                 "submit_job": self.job_request(graph, plan, run_dir, submission_id(graph.pipeline.name, plan.name, "<8 hex digits>"))}
                for plan in plans if plan.runs]
        header = ("# Ray Jobs API submissions of `vlcluster submit --backend ray` (JobSubmissionClient.submit_job arguments);\n"
                  "# the driver submits each once the stages it starts after are done; finished stages are left out.\n")
        return header + yaml.safe_dump(jobs, sort_keys=False, width=1000)

    def describe(self, plans: list[StagePlan], records: dict[str, dict], run_dir: Path) -> dict[str, StageStatus]:
        statuses = job_statuses(records) if ray_records(records) else {}
        return {plan.name: describe_job(records[plan.name], statuses.get(plan.name), stage_dir(run_dir, plan.name).log_file)
                for plan in plans}

    def logs(self, run_dir: Path, stage: str, record: dict) -> str:
        """The stage log; where the run dir is not shared with the node that ran it, Ray's copy."""
        from vlcluster.backends.ray.jobs import job_logs
        from vlcluster.backends.run_status import no_log, stage_log_text

        text = stage_log_text(run_dir, stage)
        if text is None:
            text = job_logs(record)
        if text is None:
            raise no_log(run_dir, stage)
        return text

    def cancel(self, run_dir: Path, records: dict[str, dict]) -> list[str]:
        from vlcluster.backends.ray.jobs import stop

        return stop(records)
