"""``vlcluster``: submit, plan, render, status, logs, cancel, schema, merge, metrics, report, data."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlcluster.backends import BACKENDS
from vlcluster.jobspec.load import SpecError

console = Console(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


def load_graph_from_file(path: str, overrides: list[str], run_dir: str | None):
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import load_pipeline

    from vlcluster.storage.config import activate
    from vlcluster.storage.paths import run_path

    pipeline = load_pipeline(path, overrides)
    activate(pipeline.storage)  # this process and every stage it starts
    graph = build_graph(pipeline, path)
    return graph, run_path(run_dir or pipeline.resolved_run_dir)


def print_plan(graph, plans, run_dir: Path) -> None:
    from vlcluster.storage.errors import redact

    table = Table(title=f"{graph.pipeline.name} -> {redact(str(run_dir))}", title_justify="left")
    for column in ("stage", "kind", "after", "ranks", "action"):
        table.add_column(column)
    for plan in plans:
        table.add_row(plan.name, plan.kind, ", ".join(plan.deps) or "-", f"{plan.nodes}x{plan.ranks // plan.nodes}", plan.describe())
    console.print(table)


def resolved_details(graph) -> list[str]:
    """Per-stage facts a user checks before spending cluster time."""
    lines = []
    for name in graph.order:
        spec = graph.pipeline.stages[name]
        res = spec.resources
        facts = [f"{res.nodes} node(s) x {res.ranks_per_node} rank(s)", f"{res.gpus_per_node} GPU/node"]
        if res.time_min:
            facts.append(f"time {res.time_min} min")
        train = getattr(spec, "train", None)
        if train is not None:
            sizes = train.rank_batch_sizes(res.world_size)
            per_rank = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
            facts.append(f"{train.steps} steps, batch {train.batch_size} ({per_rank}/rank), lr {train.lr:g}, warm-up {train.warmup_steps}")
            if spec.data.train:
                facts.append(shard_count(spec.data.train))
        lines.append(f"{name}: " + "; ".join(facts))
    return lines


def shard_count(patterns: str | list[str]) -> str:
    """How many train shards, without listing an object store (plan runs offline)."""
    from vlcluster.data.shards import expand_urls
    from vlcluster.storage.paths import is_remote
    from vlcluster.storage.shardlist import needs_listing

    patterns = [patterns] if isinstance(patterns, str) else patterns
    if any(is_remote(p) and needs_listing(p) for p in patterns):
        return "train shards listed at run time"
    return f"{len(expand_urls(patterns))} train shards"


def check_runnable(graph, source: str) -> None:
    from vlcluster.run import RUNNERS

    missing = [f"stages.{name}: kind {spec.kind!r}" for name, spec in graph.pipeline.stages.items() if spec.kind not in RUNNERS]
    if missing:
        raise SpecError(f"{source}: this version of vlcluster cannot run these stages yet: " + "; ".join(missing))


def cmd_plan(args) -> int:
    from vlcluster.plan import check_inputs, make_plan

    graph, run_dir = load_graph_from_file(args.file, args.set, args.run_dir)
    print_plan(graph, make_plan(graph, run_dir), run_dir)
    for line in resolved_details(graph):
        console.print(f"  {line}")
    try:
        check_inputs(graph, args.file, include_remote=False)
    except SpecError as exc:  # plan still shows everything; submit refuses
        console.print(f"[yellow]warning:[/] {escape(str(exc))}")
    return 0


def cmd_submit(args) -> int:
    from vlcluster.backends import get_backend
    from vlcluster.context import save_pipeline
    from vlcluster.plan import check_inputs, make_plan

    graph, run_dir = load_graph_from_file(args.file, args.set, args.run_dir)
    check_runnable(graph, args.file)
    if args.address and args.backend != "ray":
        raise SpecError(f"--address is for --backend ray (not {args.backend})")
    backend = get_backend(args.backend, **({"address": args.address} if args.address else {}))
    backend.validate(graph, args.file)
    if not args.dry_run:
        from vlcluster.storage.errors import check_run_dir

        check_run_dir(run_dir, args.file)
    try:
        check_inputs(graph, args.file, include_remote=not args.dry_run)
    except SpecError as exc:
        if not args.dry_run:
            raise
        errors.print(f"[yellow]warning:[/] {escape(str(exc))}")  # a dry run still shows what would be queued
    plans = make_plan(graph, run_dir)
    print_plan(graph, plans, run_dir)
    if args.dry_run:
        if hasattr(backend, "render"):  # e.g. the sbatch scripts of the slurm backend
            sys.stdout.write(backend.render(graph, plans, run_dir))
        return 0
    save_pipeline(run_dir, graph)
    started = time.perf_counter()
    ok = backend.submit(graph, plans, run_dir)
    elapsed = time.perf_counter() - started
    for plan in plans:
        report = run_dir / plan.name / "report.md"
        if plan.kind == "report" and report.is_file():
            console.print(report.read_text())
    if getattr(backend, "queues", False):  # e.g. slurm: submit returns once every job is queued
        console.print(f"queued in {elapsed:.1f} s")
        return 0
    verdict = "[green]all stages done[/]" if ok else "[red]some stages failed[/] (vlcluster status " + str(run_dir) + ")"
    console.print(f"{verdict} in {elapsed:.1f} s")
    return 0 if ok else 1


def cmd_render(args) -> int:
    """The manifests a pipeline becomes on Kubernetes (KubeRay); nothing is applied."""
    from vlcluster.backends.k8s import dump, load_profile, manifest_file, render_manifests

    graph, _ = load_graph_from_file(args.file, args.set, args.run_dir)
    manifests = render_manifests(graph, args.file, args.set, args.run_dir, load_profile(args.profile))
    if args.validate:
        from vlcluster.backends.k8s_schema import validation_errors

        problems = validation_errors(manifests)
        if problems:
            raise SpecError(f"{args.file}: rendered manifests do not validate: " + "; ".join(problems))
    if args.out is None:
        sys.stdout.write(dump(manifests))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for manifest in manifests:
        path = out / manifest_file(manifest)
        path.write_text(dump([manifest]))
        console.print(f"wrote {path}")
    return 0


def cmd_status(args) -> int:
    from vlcluster.context import load_graph
    from vlcluster.plan import make_plan
    from vlcluster.rundir import stage_dir
    from vlcluster.storage.errors import redact
    from vlcluster.storage.paths import run_path

    run_dir = run_path(args.run_dir)
    graph = load_graph(run_dir)
    plans = make_plan(graph, run_dir)
    records = {plan.name: stage_dir(run_dir, plan.name).read_state() for plan in plans}
    slurm_states = slurm_job_states(records)
    ray_states = ray_job_states(records)
    table = Table(title=f"{graph.pipeline.name} ({redact(str(run_dir))})", title_justify="left")
    for column in ("stage", "kind", "job", "state", "detail"):
        table.add_column(column)
    states: dict[str, str] = {}
    for plan in plans:
        directory = stage_dir(run_dir, plan.name)
        record = records[plan.name]
        if record.get("backend") == "slurm":
            state, detail = describe_slurm_state(plan, record, slurm_states.get(record.get("job_id")), graph, states)
        elif record.get("backend") == "ray":
            from vlcluster.backends.ray_queue import describe

            state, detail = describe(plan, record, ray_states.get(plan.name), directory.log_file)
        else:
            state, detail = describe_state(plan, record, directory.log_file)
        states[plan.name] = state
        job = f"{record['backend']} {record['job_id']}" if record.get("backend") in {"slurm", "ray"} and record.get("job_id") else ""
        table.add_row(plan.name, plan.kind, job, state, detail)
    console.print(table)
    return 0


def slurm_job_states(records: dict[str, dict]) -> dict:
    from vlcluster.backends.slurm_queue import job_states

    return job_states([r["job_id"] for r in records.values() if r.get("backend") == "slurm" and r.get("job_id")])


def describe_slurm_state(plan, record: dict, job, graph, states: dict[str, str]) -> tuple[str, str]:
    """A stage submitted to SLURM: its job's state in accounting, and for a
    job that never ran, which upstream stage failed."""
    if plan.status == "done":
        return "done", ""
    if job is None:
        return "unknown", f"job {record.get('job_id')} not in accounting"
    facts = [f"requeued {job.restarts}x"] if job.restarts else []
    if plan.resume_step is not None:
        facts.append(f"checkpoint at step {plan.resume_step}")
    if job.state == "PENDING":
        return "pending", "; ".join([f"waiting: {job.reason}", *facts])
    if job.state in {"RUNNING", "COMPLETING", "REQUEUED"}:
        return job.state.lower(), "; ".join(facts)
    failed_upstream = sorted(dep for dep in graph.upstream(plan.name) if states.get(dep) == "failed")
    if job.state == "CANCELLED" and failed_upstream:
        return "blocked", "never started, upstream failed: " + ", ".join(failed_upstream)
    if job.state == "COMPLETED":  # exited 0 without its done-marker
        return "failed", f"no done-marker; log {record.get('log')}"
    return ("failed" if job.state != "CANCELLED" else "cancelled"), (
        f"{job.state} exit {job.exit_code}; log {record.get('log')} (slurm: {record.get('slurm_log')})"
    )


def ray_job_states(records: dict[str, dict]) -> dict[str, str | None]:
    from vlcluster.backends.ray_queue import job_statuses, ray_records

    return job_statuses(records) if ray_records(records) else {}


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed stage whose parent died stays a zombie until init reaps it: that is not running
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def describe_state(plan, record: dict, log_file: Path) -> tuple[str, str]:
    if plan.status == "done":
        return "done", ""
    recorded = record.get("state")
    if recorded == "running" and not pid_alive(record.get("pid")):
        recorded = "interrupted"
    resume = f"checkpoint at step {plan.resume_step}" if plan.resume_step is not None else ""
    if recorded == "failed":
        gated = (record.get("gate") or {}).get("passed") is False
        reason = f"{record['reason']}; " if record.get("reason") else ""
        return ("gated" if gated else "failed"), f"{reason}exit {record.get('returncode')}; log {log_file}"
    if recorded == "blocked":
        return "blocked", "upstream failed: " + ", ".join(record.get("blocked_by", []))
    if recorded in {"running", "interrupted"}:
        return recorded, resume
    return ("stale" if plan.status == "stale" else "pending"), resume


def cmd_logs(args) -> int:
    from vlcluster.rundir import stage_dir

    directory = stage_dir(args.run_dir, args.stage)
    log_file = directory.log_file
    record = directory.read_state()
    slurm_log = record.get("slurm_log")
    if not log_file.is_file() and record.get("backend") == "ray":  # run dir not shared with the node: ask Ray
        from vlcluster.backends.ray_queue import job_logs

        text = job_logs(record)
        if text is not None:
            sys.stdout.write(text)
            return 0
    if not log_file.is_file() and not (slurm_log and Path(slurm_log).is_file()):
        raise SpecError(f"{log_file}: no log (has stage {args.stage!r} started?)")
    if log_file.is_file():
        sys.stdout.write(log_file.read_text())
    if slurm_log and Path(slurm_log).is_file():  # the job wrapper's own output (submitit, tracebacks)
        sys.stdout.write(f"==== slurm job log {slurm_log}\n" + Path(slurm_log).read_text())
    return 0


def cmd_cancel(args) -> int:
    """Cancel every queued or running job of a run (slurm, ray), or the running
    stage of a local submit."""
    import signal

    from vlcluster.context import load_graph
    from vlcluster.plan import make_plan
    from vlcluster.rundir import stage_dir
    from vlcluster.storage.paths import run_path

    run_dir = run_path(args.run_dir)
    graph = load_graph(run_dir)
    records = {name: stage_dir(run_dir, name).read_state() for name in graph.order}
    done = {plan.name for plan in make_plan(graph, run_dir) if plan.status == "done"}
    # Every recorded job of a stage not done, without asking accounting first
    # (it lags a just-submitted job); SLURM ignores ids of ended jobs.
    to_cancel = [name for name, r in records.items() if r.get("backend") == "slurm" and r.get("job_id") and name not in done]
    if to_cancel:
        from vlcluster.backends.slurm_queue import cancel

        cancel([records[name]["job_id"] for name in to_cancel])
    pending_ray = {name: record for name, record in records.items() if name not in done}
    if any(record.get("backend") == "ray" for record in pending_ray.values()):
        from vlcluster.backends.ray_queue import stop

        to_cancel += stop(pending_ray)
    for name, record in records.items():
        if record.get("backend") == "local" and record.get("state") == "running" and pid_alive(record.get("pid")):
            os.kill(record["pid"], signal.SIGTERM)
            to_cancel.append(name)
    for name in to_cancel:
        stage_dir(run_dir, name).write_state(state="cancelled", cancelled=time.time())
    console.print(f"cancelled {len(to_cancel)} stage(s)" + (f": {', '.join(to_cancel)}" if to_cancel else ""))
    return 0


def cmd_schema(args) -> int:
    from vlcluster.jobspec.load import json_schema

    print(json_schema())
    return 0


def cmd_data(args) -> int:
    from vlcluster.data.synthetic import build_dataset

    summary = build_dataset(
        args.out, args.n_train, args.n_val, args.shard_size, args.image_size, args.seed,
        progress=lambda split, done, total: console.print(f"{split}: {done}/{total} shards"),
    )
    console.print(f"wrote {summary['n_train']} train and {summary['n_val']} val samples to {args.out}")
    return 0


def cmd_merge(args) -> int:
    from vlcluster.merge.apply import merge_checkpoint, method_params

    values = {
        "alpha": args.alpha, "lam": args.lam, "gamma": args.gamma, "density": args.density,
        "random_seed": args.random_seed,
        "part_alpha": {"attn": args.alpha_attn, "ffn": args.alpha_ffn, "ln": args.alpha_ln},
    }
    from vlcluster.storage.paths import run_path

    record = merge_checkpoint(  # local directories or object-store URLs
        run_path(args.source), run_path(args.out), args.method, method_params(args.method, values),
        base=run_path(args.base) if args.base else None, grams=run_path(args.grams) if args.grams else None,
    )
    console.print(f"merged {args.source} ({record['source_arch']}) with {args.method} {record['params']} -> {args.out}")
    return 0


def cmd_metrics(args) -> int:
    import json

    from vlcluster.metrics.distance import checkpoint_distances
    from vlcluster.metrics.stage import format_metrics

    from vlcluster.storage.paths import local_copy, run_path

    path = run_path(args.checkpoint)
    result = checkpoint_distances(local_copy(path / "model.safetensors" if path.is_dir() else path), args.density)
    print(json.dumps(result, indent=2) if args.json else format_metrics(result))
    return 0


def cmd_report(args) -> int:
    from vlcluster.metrics.correlation import correlation_table, point
    from vlcluster.outputs import read_result
    from vlcluster.rundir import stage_dir

    def result(run_dir: str, stage: str) -> dict:
        found = read_result(stage_dir(run_dir, stage))
        if found is None:
            raise FileNotFoundError(f"{run_dir}/{stage}: no result.json (has the stage finished?)")
        return found

    points = {
        run_dir: point(result(run_dir, args.metrics), result(run_dir, args.merged), result(run_dir, args.unmerged), args.score)
        for run_dir in args.run_dirs
    }
    console.print(correlation_table(points, args.score)[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlcluster", description="Multimodal model-merging research pipelines")
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", help="pipeline YAML file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. stages.seed.train.steps=100")
        p.add_argument("--run-dir", help="run directory (default: the file's run_dir, or runs/<name>)")

    submit = sub.add_parser("submit", help="run a pipeline (skips finished stages, resumes the rest)")
    spec_args(submit)
    submit.add_argument("--backend", default="local", choices=sorted(BACKENDS))
    submit.add_argument("--dry-run", action="store_true", help="show the plan, launch nothing")
    submit.add_argument("--address", help="ray: cluster to join (auto, host:port or http://host:8265); "
                        "default: a local Ray cluster started for the run")
    submit.set_defaults(func=cmd_submit)

    render = sub.add_parser("render", help="write the manifests a pipeline becomes (k8s: KubeRay RayCluster + RayJob)")
    spec_args(render)
    render.add_argument("--backend", default="k8s", choices=["k8s"])
    render.add_argument("-o", "--out", help="directory for one file per object (default: all to stdout)")
    render.add_argument("--profile", help="site profile (default: k8s/profile.yaml)")
    render.add_argument("--validate", action="store_true", help="check against the Kubernetes and KubeRay schemas (k8s extra)")
    render.set_defaults(func=cmd_render)

    plan = sub.add_parser("plan", help="show the DAG, resources and what would be skipped")
    spec_args(plan)
    plan.set_defaults(func=cmd_plan)

    status = sub.add_parser("status", help="state of every stage of a run")
    status.add_argument("run_dir")
    status.set_defaults(func=cmd_status)

    cancel = sub.add_parser("cancel", help="cancel every queued or running job of a run")
    cancel.add_argument("run_dir")
    cancel.set_defaults(func=cmd_cancel)

    logs = sub.add_parser("logs", help="print a stage's log")
    logs.add_argument("run_dir")
    logs.add_argument("stage")
    logs.set_defaults(func=cmd_logs)

    schema = sub.add_parser("schema", help="print the JSON schema of pipeline files")
    schema.set_defaults(func=cmd_schema)

    merge = sub.add_parser("merge", help="merge a modality-specific checkpoint into a modality-agnostic one")
    merge.add_argument("source", help="directory with model.safetensors + model.json (a stage output)")
    merge.add_argument("-o", "--out", required=True, help="output directory")
    merge.add_argument("--method", default="interpolation", choices=["interpolation", "arithmetic", "regmean", "ties", "dare"])
    merge.add_argument("--alpha", type=float, default=0.5, help="interpolation: weight of the V expert")
    for part in ("attn", "ffn", "ln"):
        merge.add_argument(f"--alpha-{part}", type=float, default=None, help=f"interpolation: alpha for {part} only")
    merge.add_argument("--lam", type=float, default=0.5, help="arithmetic/ties/dare: lambda")
    merge.add_argument("--gamma", type=float, default=1.0, help="regmean: off-diagonal scale")
    merge.add_argument("--density", type=float, default=0.5, help="ties: kept fraction; dare: keep probability")
    merge.add_argument("--random-seed", type=int, default=0, help="dare: mask seed")
    merge.add_argument("--base", help="seed checkpoint directory (W0)")
    merge.add_argument("--grams", help="grams stage directory (grams.safetensors)")
    merge.set_defaults(func=cmd_merge)

    metrics = sub.add_parser("metrics", help="mergeability metrics (L2, cosine, SSD, TSSD) of a checkpoint")
    metrics.add_argument("checkpoint", help="model.safetensors or a stage directory")
    metrics.add_argument("--density", type=float, default=0.5, help="TSSD: fraction kept by magnitude")
    metrics.add_argument("--json", action="store_true")
    metrics.set_defaults(func=cmd_metrics)

    report = sub.add_parser("report", help="Pearson r of each metric with the merge drop across runs")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--metrics", default="metrics", help="metrics stage name in each run")
    report.add_argument("--merged", default="eval_merged", help="eval stage of the merged model")
    report.add_argument("--unmerged", default="eval_msa", help="eval stage of the unmerged model")
    report.add_argument("--score", default="retrieval", choices=["retrieval", "tr", "ir", "vqa_acc"])
    report.set_defaults(func=cmd_report)

    data = sub.add_parser("data", help="write the synthetic image-text benchmark as WebDataset shards")
    data.add_argument("out")
    data.add_argument("--n-train", type=int, default=20000)
    data.add_argument("--n-val", type=int, default=500)
    data.add_argument("--shard-size", type=int, default=2000)
    data.add_argument("--image-size", type=int, default=32)
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=cmd_data)

    from vlcluster.importers.cli import add_import_parser

    add_import_parser(sub)
    return parser


def report_error(message: str) -> int:
    from vlcluster.storage.errors import redact

    errors.print("[red]error:[/] " + escape(redact(message)))
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, FileNotFoundError, ValueError) as exc:
        return report_error(str(exc))
    except Exception as exc:  # a storage failure (credentials, endpoint) is one paragraph, not a traceback
        from vlcluster.storage.errors import explain

        message = explain(exc, getattr(args, "run_dir", None) or getattr(args, "file", "") or "")
        if message is None:
            raise
        return report_error(message)
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
