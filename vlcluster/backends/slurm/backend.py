"""SLURM backend: every stage one SLURM job, submitted through submitit,
chained with ``--dependency=afterok:<ids>``; the whole pipeline is queued
at once and no driver process stays alive.

- A stage's ``resources`` plus its cluster profile (``<name>.yaml`` on the
  search path of ``profiles.py``, chosen by ``resources.profile`` or
  ``$VLCLUSTER_SLURM_PROFILE``, default ``local``; ``submit --profile``,
  ``--partition``, ``--account``, ``--qos``, ``--time`` override) give nodes,
  GPUs, CPUs, memory and time.
- Training stages run one task per node; the task starts torchrun with the
  rendezvous on the first host of the allocation (``slurm/stage.py``).
- The elements of a sweep (and the copies a pipeline sweep makes of a stage)
  are one job array. A dependant waits for the tasks it reads
  (``afterok:<array id>_<task>``, or the array id when it reads them all); an
  array whose every task reads the same-numbered task of another waits with
  ``aftercorr:<array id>``, so element 2 of ``vlpt`` starts as soon as element
  2 of ``seed`` is done.
- ``resources.max_concurrent`` is an array's ``%N``; under ``limits: {gpus: N}``
  each job also waits (``afterany``) for the jobs that held the GPU slots it
  takes (``schedule.py``), so at most N GPUs are requested at once.
- ``--kill-on-invalid-dep=yes``: a failed job's dependants are cancelled,
  never started.
- Stages already done are not submitted; the job id of every submitted stage
  goes to its ``state.json`` (what ``status``, ``logs`` and ``cancel`` read).
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from vlcluster.backends.contract import StageStatus
from vlcluster.backends.gpu_cap import cap_shape
from vlcluster.backends.node_shape import SiteDefaults, node_shape
from vlcluster.backends.slurm import jobs as slurm_jobs
from vlcluster.backends.slurm.profile import load_profile, profile_name
from vlcluster.extras import require
from vlcluster.graph import Graph
from vlcluster.jobspec.sweep import sweep_base
from vlcluster.plan import StagePlan
from vlcluster.schedule import CapShape
from vlcluster.stages.rundir import stage_dir, write_json_atomic
from vlcluster.errors import SpecError
from vlcluster.jobspec.models import ClusterProfile
from vlcluster.storage.paths import absolute, local_side


def sbatch_parameters(spec, profile: ClusterProfile, job_name: str) -> dict:
    """submitit SlurmExecutor parameters for one stage (dependencies apart)."""
    res = spec.resources
    shape = node_shape(res, spec.kind, SiteDefaults(profile.cpus_per_gpu, profile.mem_gb_per_gpu, profile.cpus_per_node, profile.mem_gb))
    gpus, cpus, mem_gb = shape.gpus, shape.cpus, shape.mem_gb
    params: dict = {
        "job_name": job_name,
        "nodes": res.nodes,
        "ntasks_per_node": 1,  # one torchrun (or one python) per node
        "cpus_per_task": cpus,
        "time": res.time_min or profile.time_min,
        "signal_delay_s": profile.signal_delay_s,
        "stderr_to_stdout": True,
        "setup": list(profile.setup),
        "additional_parameters": {"requeue": True, **profile.sbatch},
    }
    if gpus:
        params["gpus_per_node"] = f"{profile.gpu_type}:{gpus}" if profile.gpu_type else gpus
    if mem_gb:
        params["mem"] = f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"
    for field in ("partition", "account", "qos", "constraint"):
        if getattr(profile, field):
            params[field] = getattr(profile, field)
    return params


@dataclass
class Unit:
    """One SLURM submission: a stage, or the elements of a sweep as an array
    (those asking for the same resources: ``key`` is ``base~2`` for a second shape)."""

    key: str
    plans: list[StagePlan]

    @property
    def base(self) -> str:
        return sweep_base(self.plans[0].name)

    @property
    def is_array(self) -> bool:
        return len(self.plans) > 1 or self.plans[0].name != self.base


def submission_units(graph: Graph, plans: list[StagePlan]) -> list[Unit]:
    from vlcluster.estimate import submission_keys

    keys = submission_keys(graph, [plan.name for plan in plans if plan.runs])
    units: dict[str, Unit] = {}
    for plan in plans:
        if plan.runs:
            units.setdefault(keys[plan.name], Unit(keys[plan.name], [])).plans.append(plan)
    return list(units.values())


def comment(text: str) -> str:
    """A comment line of a generated script: a line break in a stage name or
    path must not end the comment and start a command."""
    return "# " + text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r") + "\n"


def dependency_flag(job_ids: list[str], corresponding: list[str] = (), ended: list[str] = ()) -> dict:
    """``afterok`` on whole jobs or array tasks, ``aftercorr`` on arrays read task by task, ``afterany`` on
    the jobs that held the GPU slots this one takes under ``limits.gpus`` (all must hold)."""
    kinds = (("afterok", job_ids), ("aftercorr", corresponding), ("afterany", ended))
    parts = [f"{kind}:" + ":".join(dict.fromkeys(ids)) for kind, ids in kinds if ids]
    if not parts:
        return {}
    return {"dependency": ",".join(parts), "kill-on-invalid-dep": "yes"}


def split_task(job_id: str) -> tuple[str, int | None]:
    """``"123_4"`` -> ("123", 4): a task of an array; ``"123"`` -> ("123", None)."""
    head, sep, tail = job_id.rpartition("_")
    return (head, int(tail)) if sep and tail.isdigit() else (job_id, None)


class SlurmBackend:
    name = "slurm"
    queues = True  # submit returns once the jobs are queued; no driver stays alive
    rendered_file = "sbatch.sh"

    def __init__(self, console: Console | None = None, python: str | None = None, profile_fields: dict | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.python = python
        self.profile_fields = profile_fields or {}  # submit --partition/--account/--qos

    def profile(self, spec) -> ClusterProfile:
        return load_profile(profile_name(spec)).model_copy(update=self.profile_fields)

    def validate(self, graph: Graph, source: str) -> None:
        require("submitit", "--backend slurm")
        for name, spec in graph.pipeline.stages.items():
            try:
                profile = self.profile(spec)
            except SpecError as exc:  # named where it was chosen: the stage's field or the environment
                chosen = f"stages.{name}.resources.profile" if spec.resources.profile else f"stages.{name}: $VLCLUSTER_SLURM_PROFILE"
                raise SpecError(f"{source}: {chosen}: {exc}") from None
            gpus = spec.resources.gpus_per_node
            if gpus and gpus > profile.gpus_per_node:
                raise SpecError(
                    f"{source}: stages.{name}.resources.gpus_per_node is {gpus}; "
                    f"profile {profile_name(spec)!r} nodes have {profile.gpus_per_node}"
                )
        cap_shape(graph, list(graph.order), None, source)  # a stage larger than limits.gpus: refused now

    # ---- the GPU cap -----------------------------------------------------------

    @staticmethod
    def throttle(graph: Graph, unit: Unit, shape: CapShape | None) -> int:
        """Tasks of an array running at once: its ``%N``."""
        if shape is not None:
            return shape.parallel[unit.key]
        limits = [graph.pipeline.stages[plan.name].resources.max_concurrent or len(unit.plans) for plan in unit.plans]
        return min(len(unit.plans), *limits)

    # ---- what each job is ------------------------------------------------

    def folder(self, run_dir: Path, unit: Unit) -> Path:
        return local_side(run_dir).resolve() / "slurm" / unit.key  # submitit's pickles and logs: a file system

    def parameters(self, graph: Graph, unit: Unit, submitted: dict[str, str], shape: CapShape | None = None,
                   unit_jobs: dict[str, str] | None = None) -> dict:
        """sbatch parameters of one unit; ``shape`` and ``unit_jobs`` (unit -> job id) under ``limits.gpus``."""
        spec = graph.pipeline.stages[unit.plans[0].name]
        params = sbatch_parameters(spec, self.profile(spec), f"{graph.pipeline.name}.{unit.key}")
        ended = [unit_jobs[base] for base in shape.waits_for[unit.key]] if shape is not None else []
        params["additional_parameters"].update(dependency_flag(*self.upstream_jobs(graph, unit, submitted), ended))
        if unit.is_array:
            params["array_parallelism"] = self.throttle(graph, unit, shape)
        return params

    def python_for(self, graph: Graph, unit: Unit) -> str:
        profile = self.profile(graph.pipeline.stages[unit.plans[0].name])
        return self.python or profile.python or sys.executable

    def jobs(self, graph: Graph, unit: Unit, run_dir: Path):
        from vlcluster.backends.slurm.stage import StageJob

        python = self.python_for(graph, unit)
        return [
            StageJob(absolute(run_dir), plan.name, plan.spec_hash, plan.kind,
                     graph.pipeline.stages[plan.name].resources.ranks_per_node, python)
            for plan in unit.plans
        ]

    @staticmethod
    def upstream_jobs(graph: Graph, unit: Unit, submitted: dict[str, str]) -> tuple[list[str], list[str]]:
        """What this unit waits for: job ids and array tasks (``afterok``), and
        arrays whose task i the unit's task i reads (``aftercorr``)."""
        whole: list[str] = []
        read: dict[str, list[set[int]]] = {}  # array id -> the tasks each element of the unit reads
        for index, plan in enumerate(unit.plans):
            for dep in graph.deps[plan.name]:
                if dep in submitted:
                    job, task = split_task(submitted[dep])
                    if task is None:
                        whole.append(job)
                    else:
                        read.setdefault(job, [set() for _ in unit.plans])[index].add(task)
        corresponding: list[str] = []
        for job, per_element in read.items():
            if unit.is_array and all(tasks == {index} for index, tasks in enumerate(per_element)):
                corresponding.append(job)
                continue
            tasks = set().union(*per_element)
            every = {task for array, task in map(split_task, submitted.values()) if array == job}
            whole += [job] if tasks == every else [f"{job}_{task}" for task in sorted(tasks)]
        return whole, corresponding

    # ---- dry run ---------------------------------------------------------------

    def render(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> str:
        """The sbatch scripts submit would write, dependencies as <job:stage>."""
        from submitit.slurm.slurm import _make_sbatch_string

        from vlcluster.launch import Rendezvous, stage_command

        out, submitted, unit_jobs = [], {}, {}
        shape = cap_shape(graph, [plan.name for plan in plans if plan.runs], run_dir)
        if shape is not None:
            out.append(comment(f"limits.gpus {shape.cap}: each job also waits (afterany) for the jobs that held its GPUs "
                               f"before; estimated wall time {shape.hours:.1f} h"))
        for unit in submission_units(graph, plans):
            params = self.parameters(graph, unit, submitted, shape, unit_jobs)
            unit_jobs[unit.key] = f"<job:{unit.key}>"
            for index, plan in enumerate(unit.plans):
                submitted[plan.name] = f"<job:{unit.key}>_{index}" if unit.is_array else f"<job:{unit.key}>"
            folder = self.folder(run_dir, unit)
            if unit.is_array:
                params["map_count"] = len(unit.plans)
            # What submitit itself writes at submit time (its _submitit_command_str): every word quoted.
            command = f"{shlex.quote(self.python_for(graph, unit))} -u -m submitit.core._submit {shlex.quote(str(folder))}"
            spec = graph.pipeline.stages[unit.plans[0].name]
            res = spec.resources
            rendezvous = Rendezvous(res.nodes, "$SLURM_NODEID", "<first host of $SLURM_JOB_NODELIST>", "<20000 + job id % 20000>") if res.nodes > 1 else None
            python = self.python_for(graph, unit)
            launch = " ".join(stage_command(spec.kind, absolute(run_dir), unit.plans[0].name, res.ranks_per_node, python, rendezvous))
            elements = "".join(comment(f"  task {index}: {plan.name}") for index, plan in enumerate(unit.plans)) if unit.is_array else ""
            out.append(
                comment(f"---- {unit.key}: {'job array of ' + str(len(unit.plans)) if unit.is_array else 'one job'}"
                        f" ({spec.kind}, profile {profile_name(spec)})") + elements
                + comment(f"each task runs: {launch}")
                + _make_sbatch_string(command=command, folder=folder, **params)
            )
        return "\n".join(out)

    # ---- submit ----------------------------------------------------------------

    def submit(self, graph: Graph, plans: list[StagePlan], run_dir: Path) -> bool:
        import submitit

        self.refuse_if_queued(run_dir, plans)
        submitted: dict[str, str] = {}
        unit_jobs: dict[str, str] = {}
        shape = cap_shape(graph, [plan.name for plan in plans if plan.runs], run_dir)
        for index, unit in enumerate(submission_units(graph, plans), start=1):
            executor = submitit.SlurmExecutor(folder=self.folder(run_dir, unit), max_num_timeout=self.max_requeues(graph, unit),
                                              python=shlex.quote(self.python_for(graph, unit)))  # a word of the sbatch script
            executor.update_parameters(**self.parameters(graph, unit, submitted, shape, unit_jobs))
            jobs = self.jobs(graph, unit, run_dir)
            if unit.is_array:
                with executor.batch():
                    handles = [executor.submit(job) for job in jobs]
            else:
                handles = [executor.submit(jobs[0])]
            unit_jobs[unit.key] = split_task(handles[0].job_id)[0]
            for plan, handle in zip(unit.plans, handles):
                submitted[plan.name] = handle.job_id
                self.record(run_dir, plan, handle.job_id, handle.paths.stdout)
            ids = ", ".join(handle.job_id for handle in handles)
            self.console.print(f"[bold]{unit.key}[/]: submitted as job {ids}")
        for plan in plans:
            if not plan.runs:
                self.console.print(f"[dim]{plan.name}: skipped (done)[/]")
        self.console.print(f"queued {len(submitted)} stage(s); follow with: vlcluster status {run_dir}")
        return True

    def max_requeues(self, graph: Graph, unit: Unit) -> int:
        return self.profile(graph.pipeline.stages[unit.plans[0].name]).max_requeues

    @staticmethod
    def record(run_dir: Path, plan: StagePlan, job_id: str, slurm_log: Path) -> None:
        directory = stage_dir(run_dir, plan.name)
        write_json_atomic(directory.state_file, {
            "backend": "slurm", "state": "submitted", "job_id": job_id, "submitted": time.time(),
            "slurm_log": str(slurm_log), "log": str(directory.log_file),
        })

    @staticmethod
    def refuse_if_queued(run_dir: Path, plans: list[StagePlan]) -> None:
        records = {plan.name: stage_dir(run_dir, plan.name).read_state() for plan in plans}
        ids = {name: record["job_id"] for name, record in records.items() if record.get("backend") == "slurm" and record.get("job_id")}
        states = slurm_jobs.job_states(list(ids.values()))
        active = [f"{name} (job {job_id})" for name, job_id in ids.items() if job_id in states and states[job_id].active]
        if active:
            raise SpecError(f"{run_dir}: jobs of this run are still queued or running: {', '.join(active)}; "
                            f"wait, or `vlcluster cancel {run_dir}` first")

    # ---- what status, logs and cancel ask ---------------------------------------

    def describe(self, plans: list[StagePlan], records: dict[str, dict], run_dir: Path) -> dict[str, StageStatus]:
        jobs = slurm_jobs.job_states([r["job_id"] for r in records.values() if r.get("job_id")])
        return {plan.name: slurm_jobs.describe_job(plan, records[plan.name], jobs.get(records[plan.name].get("job_id"))) for plan in plans}

    def logs(self, run_dir: Path, stage: str, record: dict) -> str:
        """The stage log, then the job wrapper's own output (submitit, tracebacks)."""
        from vlcluster.backends.run_status import no_log, stage_log_text

        text = stage_log_text(run_dir, stage)
        slurm_log = self.job_log(run_dir, record)
        if slurm_log is not None:
            text = (text or "") + f"==== slurm job log {slurm_log}\n" + slurm_log.read_text(errors="replace")
        if text is None:
            raise no_log(run_dir, stage)
        return text

    @staticmethod
    def job_log(run_dir: Path, record: dict) -> Path | None:
        """The submitit log a record names, only if it lies in this run's
        submitit folders (``state.json`` may have been written by anyone)."""
        named = record.get("slurm_log")
        if not isinstance(named, str) or not named.endswith("_log.out"):
            return None
        path = Path(named).resolve()
        if not path.is_relative_to(local_side(run_dir).resolve() / "slurm") or not path.is_file():
            return None
        return path

    def cancel(self, run_dir: Path, records: dict[str, dict]) -> list[str]:
        """Every recorded job, without asking accounting first (it lags a
        just-submitted job); SLURM ignores ids of ended jobs."""
        names = [name for name, record in records.items() if record.get("job_id")]
        slurm_jobs.cancel([records[name]["job_id"] for name in names])
        return names
