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
from vlcluster.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, SpecError


class PipeConsole(Console):
    """A console that leaves a closed pipe to :func:`main` (rich's own handler exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


console = PipeConsole(highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)


def load_graph_from_file(path: str, overrides: list[str], run_dir: str | None, pin_hub: bool = False):
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import load_pipeline

    from vlcluster.storage.config import activate
    from vlcluster.storage.paths import run_path

    pipeline = load_pipeline(path, overrides)
    activate(pipeline.storage)  # this process and every stage it starts
    if pin_hub:  # hf:// references resolved once, here: pipeline.json and the stage hashes carry the commit
        from vlcluster.hub import pin_pipeline

        pin_pipeline(pipeline)
    graph = build_graph(pipeline, path)
    return graph, run_path(run_dir or pipeline.resolved_run_dir)


def print_plan(graph, plans, run_dir: Path) -> None:
    from vlcluster.storage.errors import redact

    table = Table(title=f"{graph.pipeline.name} -> {redact(str(run_dir))}", title_justify="left")
    for column in ("stage", "kind", "after", "ranks", "action"):
        table.add_column(column, overflow="fold")  # whole names, however long a sweep makes them
    for plan in plans:
        table.add_row(escape(plan.name), plan.kind, escape(", ".join(plan.deps)) or "-", f"{plan.nodes}x{plan.ranks // plan.nodes}", plan.describe())
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
                facts.append(shard_count(spec.data.train_patterns()))
        lines.append(f"{name}: " + "; ".join(facts))
    return lines


def shard_count(patterns: str | list[str]) -> str:
    """How many train shards, without listing an object store (plan runs offline)."""
    from vlcluster.storage.paths import is_remote
    from vlcluster.storage.shardlist import expand, needs_listing

    patterns = [patterns] if isinstance(patterns, str) else patterns
    if any(is_remote(p) and needs_listing(p) for p in patterns):
        return "train shards listed at run time"
    return f"{len(expand(patterns))} train shards"


def cmd_plan(args) -> int:
    from vlcluster.estimate import estimate, summary
    from vlcluster.plan import make_plan
    from vlcluster.preflight import preflight, problems_paragraph

    graph, run_dir = load_graph_from_file(args.file, args.set, args.run_dir)
    profile_options(args, graph)  # --profile, --time: estimates on another cluster
    plans = make_plan(graph, run_dir)
    estimates = estimate(graph, run_dir, args.mfu)
    totals = summary(graph, estimates, args.file)
    # plan lists no object store and no glob (submit does); it still shows everything, submit refuses
    problems = preflight(graph.pipeline, args.file, "local", include_remote=False)
    if args.json:
        return print_plan_json(graph, plans, estimates, {**totals, "problems": problems}, run_dir)
    print_plan(graph, plans, run_dir)
    for line in resolved_details(graph):
        console.print(f"  {escape(line)}")  # sweep elements are named stage[key=value]
    print_estimates(graph, estimates, totals)
    if problems:
        console.print(f"[yellow]warning:[/] {escape(problems_paragraph(args.file, problems))}")
    return EXIT_OK


def print_estimates(graph, estimates, totals) -> None:
    """GPU-hours and wall time of the training stages, the total and the critical path (estimate.py)."""
    from vlcluster.estimate import gpu_hours_text, hours_text

    if not totals["estimated"] and not totals["unestimated_gpu_hours_bound"]["stages"]:
        console.print("estimates: no stage asks for GPUs (GPU-hours and wall times are estimated for GPU training stages)")
        return
    table = Table(title="estimates (FLOPs per sample x samples / (GPUs x peak x MFU))", title_justify="left")
    for column in ("stage", "GPUs", "GPU-h", "wall", "MFU", "how"):
        table.add_column(column, overflow="fold")
    for name, e in estimates.items():
        if e.hours is not None:
            mfu = f"{e.mfu.value:.2f} ({'default' if e.mfu.source == 'default' else 'measured'})" if e.mfu else "-"
            table.add_row(escape(name), str(e.gpus), gpu_hours_text(e.gpu_hours), hours_text(e.hours), mfu, escape(e.note))
    console.print(table)
    gpus = ", ".join(totals["gpus"]) or "-"
    console.print(f"total: {gpu_hours_text(totals['gpu_hours'])} GPU-hours on {escape(gpus)} over {totals['estimated']} training stage(s)")
    bound = totals["unestimated_gpu_hours_bound"]
    if bound["stages"]:
        kinds = ", ".join(f"{count} {kind}" for kind, count in bound["kinds"].items())
        console.print(f"not estimated: {bound['stages']} GPU stage(s) ({kinds}); at their time limits they hold at most "
                      f"{gpu_hours_text(bound['gpu_hours'])} GPU-hours (counted 0 in the critical path)")
    for source in totals["mfu_sources"]:
        console.print(escape(f"MFU {source}" + (" (plan --mfu sets it; a finished stage of the same shape and GPU in "
                                                "this or a sibling run directory replaces it)" if source == "default" else "")))
    path = totals["critical_path"]
    console.print(escape(f"critical path, unlimited GPUs: {hours_text(path['hours'])} ({' -> '.join(path['stages'])})"))
    if totals["limits"]:
        console.print(f"critical path with limits.gpus {totals['limits']['gpus']}: {hours_text(totals['limits']['hours'])}")


def print_plan_json(graph, plans, estimates, totals, run_dir) -> int:
    import json

    from vlcluster.storage.errors import redact

    stages = [{"name": plan.name, "kind": plan.kind, "deps": list(plan.deps), "action": plan.status, "nodes": plan.nodes,
               "ranks": plan.ranks, "estimate": estimates[plan.name].to_json()} for plan in plans]
    print(json.dumps({"pipeline": graph.pipeline.name, "run_dir": redact(str(run_dir)), "stages": stages, "total": totals}, indent=2))
    return EXIT_OK


def add_profile_flags(parser: argparse.ArgumentParser, slurm_fields: bool) -> None:
    """--profile and --time for every stage; --partition/--account/--qos override the SLURM profile's."""
    parser.add_argument("--profile", help="cluster profile of every stage (`vlcluster profiles` lists them)")
    parser.add_argument("--time", type=int, metavar="MIN", help="time limit of every stage, in minutes")
    if slurm_fields:
        for name in ("partition", "account", "qos"):
            parser.add_argument(f"--{name}", help=f"slurm: the {name} of every job (instead of the profile's)")


def profile_options(args, graph) -> dict:
    """Apply --profile/--time to the stages; the backend options --partition/--account/--qos become."""
    from vlcluster.profiles import ProfileOverrides

    overrides = ProfileOverrides.from_args(args)
    if overrides.time_min is not None and overrides.time_min <= 0:
        raise SpecError(f"--time must be a positive number of minutes, got {overrides.time_min}")
    overrides.apply_to_stages(graph.pipeline)
    if not overrides.fields:
        return {}
    if args.backend != "slurm":
        raise SpecError(f"--{overrides.fields[0][0]} is for --backend slurm (not {args.backend})")
    return {"profile_fields": dict(overrides.fields)}


def cmd_profiles(args) -> int:
    """The SLURM cluster profiles on the search path, and where each was found."""
    from vlcluster.profiles import found_profiles, profile_dirs

    console.print("search path (first match wins): " + escape(", ".join(str(folder) for folder in profile_dirs())))
    table = Table()
    for column in ("profile", "file", "note"):
        table.add_column(column, overflow="fold")
    for name, path, shadowed in found_profiles():
        table.add_row(escape(name), escape(str(path)), "shadowed by an earlier one" if shadowed else "")
    console.print(table)
    return EXIT_OK


def run_preflight(args) -> None:
    """Every input of the pipeline checked before anything is queued: all problems in one report
    (exit 2); a dry run prints them as a warning and still shows what would be queued."""
    from vlcluster.jobspec.load import load_pipeline
    from vlcluster.preflight import preflight, problems_paragraph
    from vlcluster.profiles import ProfileOverrides
    from vlcluster.storage.config import activate

    pipeline = load_pipeline(args.file, args.set)
    activate(pipeline.storage)
    problems = preflight(pipeline, args.file, args.backend, include_remote=not args.dry_run,
                         adjust=ProfileOverrides.from_args(args).apply_to_stages)
    if not args.dry_run:
        from vlcluster.storage.errors import check_run_dir
        from vlcluster.storage.paths import run_path

        try:  # the run directory's bucket and credentials, in the same report
            check_run_dir(run_path(args.run_dir or pipeline.resolved_run_dir), "run_dir")
        except SpecError as exc:
            problems.append(str(exc).removeprefix("run_dir: "))
    if problems and not args.dry_run:
        raise SpecError(problems_paragraph(args.file, problems))
    if problems:
        errors.print(f"[yellow]warning:[/] {escape(problems_paragraph(args.file, problems))}")


def cmd_submit(args) -> int:
    from vlcluster.backends import get_backend
    from vlcluster.stages.context import save_pipeline
    from vlcluster.plan import make_plan

    run_preflight(args)
    graph, run_dir = load_graph_from_file(args.file, args.set, args.run_dir, pin_hub=not args.dry_run)
    if args.address and args.backend != "ray":
        raise SpecError(f"--address is for --backend ray (not {args.backend})")
    backend = get_backend(args.backend, **({"address": args.address} if args.address else {}), **profile_options(args, graph))
    backend.validate(graph, args.file)
    if not args.dry_run:
        from vlcluster.storage.errors import check_run_dir

        check_run_dir(run_dir, args.file)
    plans = make_plan(graph, run_dir)
    print_plan(graph, plans, run_dir)
    if args.dry_run:
        sys.stdout.write(backend.render(graph, plans, run_dir))  # e.g. the sbatch scripts of the slurm backend
        return EXIT_OK
    save_pipeline(run_dir, graph)
    started = time.perf_counter()
    ok = backend.submit(graph, plans, run_dir)
    elapsed = time.perf_counter() - started
    for plan in plans:
        report = run_dir / plan.name / "report.md"
        if plan.kind == "report" and report.is_file():
            console.print(report.read_text())
    if backend.queues:  # e.g. slurm: submit returns once every job is queued
        console.print(f"queued in {elapsed:.1f} s")
        return EXIT_OK
    print_closing_line(graph, plans, run_dir, elapsed, ok)
    return EXIT_OK if ok else EXIT_FAILED


def print_closing_line(graph, plans, run_dir: Path, elapsed: float, ok: bool) -> None:
    """The run's wall time, what ran and the slowest stages, from the stages' records."""
    from vlcluster.run_times import closing_line
    from vlcluster.stages.rundir import stage_dir
    from vlcluster.storage.errors import redact

    records = {plan.name: stage_dir(run_dir, plan.name).read_state() for plan in plans}
    line = escape(closing_line(graph.pipeline.name, plans, records, elapsed, ok))
    console.print(f"[green]{line}[/]" if ok else f"[red]{line}[/] (vlcluster status {escape(redact(str(run_dir)))})")


def cmd_render(args) -> int:
    """What a pipeline becomes on a backend, launching nothing: KubeRay manifests
    (k8s), the sbatch scripts (slurm), the Ray Jobs API submissions (ray), the
    commands (local). The last three are what ``submit --dry-run`` prints."""
    if args.backend != "k8s":
        return render_backend(args)
    from vlcluster.backends.k8s.profile import load_profile
    from vlcluster.backends.k8s.render import dump, manifest_file, render_manifests

    graph, _ = load_graph_from_file(args.file, args.set, args.run_dir)
    manifests = render_manifests(graph, args.file, args.set, args.run_dir, load_profile(args.profile))
    if args.validate:
        from vlcluster.backends.k8s.validate import validation_errors

        problems = validation_errors(manifests)
        if problems:
            raise SpecError(f"{args.file}: rendered manifests do not validate: " + "; ".join(problems))
    if args.out is None:
        sys.stdout.write(dump(manifests))
        return EXIT_OK
    output_directory(args.out, "-o", "render writes one file per manifest there")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for manifest in manifests:
        path = out / manifest_file(manifest)
        path.write_text(dump([manifest]))
        console.print(f"wrote {path}")
    return EXIT_OK


def render_backend(args) -> int:
    from vlcluster.backends import get_backend
    from vlcluster.plan import make_plan

    if args.profile:
        raise SpecError(f"--profile is the k8s site profile, not for --backend {args.backend} "
                        "(a slurm stage names its cluster profile in resources.profile)")
    if args.validate:
        raise SpecError(f"--validate checks k8s manifests against their schemas, not for --backend {args.backend}")
    graph, run_dir = load_graph_from_file(args.file, args.set, args.run_dir)
    backend = get_backend(args.backend)
    backend.validate(graph, args.file)
    text = backend.render(graph, make_plan(graph, run_dir), run_dir)
    if args.out is None:
        sys.stdout.write(text)
        return EXIT_OK
    output_directory(args.out, "-o", f"render writes {backend.rendered_file} there")
    path = Path(args.out) / backend.rendered_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    console.print(f"wrote {path}")
    return EXIT_OK


def load_run(run_dir_arg: str):
    """The run's graph, plans and stage records (``state.json``)."""
    from vlcluster.stages.context import load_graph
    from vlcluster.plan import make_plan
    from vlcluster.stages.rundir import stage_dir
    from vlcluster.storage.paths import run_path

    run_dir = run_path(run_dir_arg)
    graph = load_graph(run_dir)
    plans = make_plan(graph, run_dir)
    return run_dir, graph, plans, {plan.name: stage_dir(run_dir, plan.name).read_state() for plan in plans}


def cmd_status(args) -> int:
    from vlcluster.backends.run_status import run_status
    from vlcluster.run_times import format_seconds, stage_seconds
    from vlcluster.storage.errors import redact
    from vlcluster.watch import all_ended, status_record

    while True:
        run_dir, graph, plans, records = load_run(args.run_dir)
        statuses = run_status(graph, plans, records, run_dir)
        if args.json:
            import json

            print(json.dumps(status_record(graph.pipeline.name, plans, statuses, run_dir, records), indent=2), flush=True)
        else:
            table = Table(title=f"{graph.pipeline.name} ({redact(str(run_dir))})", title_justify="left")
            for column in ("stage", "kind", "job", "state", "time", "detail"):
                table.add_column(column)
            for plan, status in zip(plans, statuses.values()):
                took = format_seconds(stage_seconds(records[plan.name], status.state))
                table.add_row(escape(plan.name), plan.kind, status.job, status.state, took, escape(status.detail))
            if args.watch and console.is_terminal:
                console.clear()
            console.print(table)
        if not args.watch or all_ended(statuses):
            return EXIT_OK if all(status.state == "done" for status in statuses.values()) or not args.watch else EXIT_FAILED
        time.sleep(args.interval)


def add_watch_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watch", action="store_true", help="redraw until every stage has ended (or Ctrl-C); "
                        "exit 0 when all are done")
    parser.add_argument("--json", action="store_true", help="the states as JSON (with --watch: one document per look)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between looks (--watch)")


def cmd_logs(args) -> int:
    from vlcluster.backends import get_backend
    from vlcluster.backends.run_status import backend_of
    from vlcluster.stages.rundir import stage_dir
    from vlcluster.storage.paths import run_path

    run_dir = run_path(args.run_dir)
    refuse_unknown_stage(run_dir, args.stage)
    if args.follow:
        return follow_stage_log(run_dir, args.stage, args.interval)
    record = stage_dir(run_dir, args.stage).read_state()
    sys.stdout.write(get_backend(backend_of(record)).logs(run_dir, args.stage, record))
    return EXIT_OK


def refuse_unknown_stage(run_dir: Path, stage: str) -> None:
    """A stage the run does not have is named with the closest one it has."""
    from vlcluster.stages.context import load_graph
    from vlcluster.suggest import did_you_mean

    try:
        stages = load_graph(run_dir).pipeline.stages
    except (SpecError, FileNotFoundError, ValueError):
        return  # no readable pipeline record: the log lookup says what is missing
    if stage not in stages:
        raise SpecError(f"{run_dir}: no stage {stage!r} in this run (stages: {', '.join(stages)}){did_you_mean(stage, stages)}")


def follow_stage_log(run_dir: Path, stage: str, interval: float) -> int:
    """``logs -f``: the stage log as it grows, until the stage has ended (any backend: every one writes it)."""
    from vlcluster.backends.run_status import run_status
    from vlcluster.stages.rundir import stage_dir
    from vlcluster.watch import ENDED, follow

    final: dict[str, str] = {}

    def ended() -> bool:
        _, graph, plans, records = load_run(str(run_dir))
        final["state"] = run_status(graph, plans, records, run_dir)[stage].state
        return final["state"] in ENDED

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    follow(stage_dir(run_dir, stage).log_file, write, ended, interval)
    return EXIT_OK if final.get("state") == "done" else EXIT_FAILED


def cmd_cancel(args) -> int:
    """Cancel every queued or running job of a run (slurm, ray), or the running
    stage of a local submit."""
    from collections import defaultdict

    from vlcluster.backends import get_backend
    from vlcluster.backends.run_status import backend_of
    from vlcluster.stages.rundir import stage_dir

    run_dir, _, plans, records = load_run(args.run_dir)
    by_backend: dict[str, dict[str, dict]] = defaultdict(dict)
    for plan in plans:
        if plan.status != "done":
            by_backend[backend_of(records[plan.name])][plan.name] = records[plan.name]
    cancelled = [name for backend, group in by_backend.items() for name in get_backend(backend).cancel(run_dir, group)]
    for name in cancelled:
        stage_dir(run_dir, name).write_state(state="cancelled", cancelled=time.time())
    console.print(escape(f"cancelled {len(cancelled)} stage(s)" + (f": {', '.join(cancelled)}" if cancelled else "")))
    return EXIT_OK


def cmd_schema(args) -> int:
    from vlcluster.jobspec.load import json_schema

    print(json_schema())
    return EXIT_OK


def cmd_data(args) -> int:
    from vlcluster.data.synthetic import build_dataset

    summary = build_dataset(
        args.out, args.n_train, args.n_val, args.shard_size, args.image_size, args.seed,
        progress=lambda split, done, total: console.print(f"{split}: {done}/{total} shards"),
    )
    console.print(f"wrote {summary['n_train']} train and {summary['n_val']} val samples to {args.out}")
    return EXIT_OK


def cmd_index(args) -> int:
    from vlcluster.data.corpusindex import INDEX_NAME, index_beside, write_index
    from vlcluster.storage.shardlist import expand

    urls = expand(args.shards)
    if not urls:
        raise ValueError("no shards given")

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            console.print(f"indexed {done}/{total} shards")

    written = [write_index(urls, args.out, progress)] if args.out else index_beside(urls, progress)
    for summary in written:
        console.print(f"wrote {escape(summary['index'])}: {summary['shards']} shards, {summary['items']} items, {summary['bytes']} bytes")
        print_disagreements(summary["disagree_with_img2dataset"])
    if args.out and not args.out.endswith("/" + INDEX_NAME):
        console.print(f"the training loader looks for {INDEX_NAME} beside the shards: put it there to use it")
    return EXIT_OK


def print_disagreements(disagree: list[dict], shown: int = 10) -> None:
    """Shards holding another number of samples than img2dataset says it wrote
    (an interrupted copy or upload): indexed as they are, named here."""
    for entry in disagree[:shown]:
        errors.print(f"[yellow]warning:[/] {escape(entry['shard'])} holds {entry['items']} readable samples; img2dataset's "
                     f"_stats.json beside it says it wrote {entry['img2dataset']} (copied or uploaded only in part?)")
    if len(disagree) > shown:
        errors.print(f"[yellow]warning:[/] ... and {len(disagree) - shown} more shards that disagree with their _stats.json")


def cmd_convert(args) -> int:
    from vlcluster.model.external import convert_to_model_dir, export_beit, export_vlmo

    if args.to_format:
        report = (export_beit if args.to_format == "beit" else export_vlmo)(args.source, args.out)
    else:
        names = ("heads", "vocab_size", "max_text_len", "vl_layers", "image_size")
        overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        report = convert_to_model_dir(args.source, args.from_format, args.out, args.size, **overrides)
    for line in report.lines():
        console.print(escape(line))
    console.print(f"wrote {args.out}")
    return EXIT_OK


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """--method and one flag per merge parameter, from the declarations in merge/methods.py."""
    from vlcluster.merge.methods import METHOD_NAMES, PARAMS, PART_FAMILY, SPECS

    parser.add_argument("--method", default="interpolation", choices=METHOD_NAMES)
    for name, param in PARAMS.items():
        users = "/".join(method for method, spec in SPECS.items() if name in spec.params)
        if param.type is dict:  # per-part values: one flag per part
            for part in dict.fromkeys(PART_FAMILY.values()):
                parser.add_argument(f"--alpha-{part}", type=float, default=None, help=f"{users}: alpha for {part} only")
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=param.type, default=param.default,
                            help=f"{users}: {param.help} ({param.range_text})")


def cmd_merge(args) -> int:
    from vlcluster.merge.methods import PART_FAMILY, PARAMS, SPECS, param_problems

    values = {name: getattr(args, name) for name in PARAMS if name != "part_alpha"}
    values["part_alpha"] = {part: getattr(args, f"alpha_{part}") for part in dict.fromkeys(PART_FAMILY.values())}
    problems = param_problems(args.method, values)
    spec = SPECS[args.method]
    if spec.needs_base and not args.base:
        problems.append("needs the seed checkpoint W0 (--base DIR)")
    if spec.needs_grams and not args.grams:
        problems.append("needs the Gram matrices of a grams stage (--grams DIR)")
    if problems:
        raise SpecError(f"vlcluster merge --method {args.method}: " + "; ".join(problems))
    output_directory(args.out, "-o", "merge writes model.safetensors and model.json there")
    from vlcluster.merge.apply import merge_checkpoint
    from vlcluster.merge.methods import chosen_params

    params = chosen_params(args.method, values)
    from vlcluster.storage.paths import run_path

    source, base, grams = (checkpoint_path(path, role) if path else None
                           for path, role in ((args.source, "source"), (args.base, "--base"), (args.grams, "--grams")))
    record = merge_checkpoint(  # local directories or object-store URLs
        source, run_path(args.out), args.method, params, base=base, grams=grams,
    )
    console.print(f"merged {args.source} ({record['source_arch']}) with {args.method} {record['params']} -> {args.out}")
    return EXIT_OK


def output_directory(argument: str, flag: str, purpose: str) -> None:
    """An output directory that a file stands in the way of is one paragraph, not a FileExistsError."""
    from vlcluster.storage.paths import is_remote

    if is_remote(argument):  # object stores have no directories to collide with
        return
    path = Path(argument)
    blocking = next((part for part in (path, *path.parents) if part.exists() and not part.is_dir()), None)
    if blocking == path:
        raise SpecError(f"{argument}: {flag} is an existing file; give a directory ({purpose})")
    if blocking is not None:
        raise SpecError(f"{argument}: {flag}: {blocking} is a file, so no directory can be made under it ({purpose})")


def checkpoint_path(argument: str, role: str):
    """A stage directory or a ``.safetensors`` file; anything else is one clear error."""
    from vlcluster.storage.paths import run_path

    path = run_path(argument)
    if path.is_dir():
        return path
    if not path.exists():
        raise SpecError(f"{argument}: {role}: no such file or directory")
    if not path.name.endswith(".safetensors"):
        raise SpecError(f"{argument}: {role} must be a stage directory (model.safetensors + model.json) "
                        "or a .safetensors file, not this file")
    if role in {"source", "--base", "checkpoint"}:  # the model's config (arch, size, layers) must be beside it
        from vlcluster.model.load import locate_model

        locate_model(path)
    return path


def metrics_along_training(args) -> int:
    import json

    from vlcluster.metrics.along_training import along_training_figure, distances_along_training, format_along_training
    from vlcluster.storage.paths import run_path

    stage = run_path(args.checkpoint)
    if not stage.is_dir():
        raise SpecError(f"{args.checkpoint}: --checkpoints takes a training stage's directory (it reads its checkpoints/step_N)")
    rows = distances_along_training(stage, args.density)
    print(json.dumps(rows, indent=2) if args.json else format_along_training(rows))
    if args.figure:
        figure = along_training_figure(rows, f"V/L expert distances along training: {args.checkpoint}", Path(args.figure))
        print(f"figure: {figure}", file=sys.stderr)  # stdout stays the table (or JSON)
    return EXIT_OK


def cmd_metrics(args) -> int:
    import json

    from vlcluster.metrics.distance import checkpoint_distances, format_metrics
    from vlcluster.model.load import locate_model
    from vlcluster.storage.paths import local_copy

    if args.checkpoints:
        return metrics_along_training(args)
    if args.figure:
        raise SpecError("vlcluster metrics --figure draws the distances along training: give it with --checkpoints")
    model = locate_model(checkpoint_path(args.checkpoint, "checkpoint"))
    result = checkpoint_distances(local_copy(model.weights), args.density, model.prefix)
    print(json.dumps(result, indent=2) if args.json else format_metrics(result))
    return EXIT_OK


def cmd_report(args) -> int:
    if args.out:
        return write_study(args)
    from vlcluster.metrics.correlation import correlation_table, point
    from vlcluster.stages.outputs import read_result
    from vlcluster.stages.rundir import stage_dir

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
    return EXIT_OK


def write_study(args) -> int:
    from vlcluster.storage.paths import run_path
    from vlcluster.study import write_study_report

    report = write_study_report(args.run_dirs, run_path(args.out), args.score)
    console.print(escape(report.summary))
    return EXIT_OK


class SuggestingParser(argparse.ArgumentParser):
    """argparse naming the closest choice to an invalid one (Python 3.14's
    ``suggest_on_error``, for older Pythons too): sub-commands, import formats,
    ``--method``, ``--backend``. Sub-parsers are made of the same class."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        from vlcluster.suggest import closest

        if action.choices is not None and value not in action.choices and (match := closest(value, action.choices)):
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices}); did you mean {match!r}?")
        super()._check_value(action, value)


def is_override(word: str) -> bool:
    return "=" in word and not word.startswith("-")


class PositionalOverrides(argparse.Action):
    """``vlcluster plan job.yaml stages.seed.train.steps=5``: positional
    overrides join ``--set`` ones, in the order written (the last wins)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for word in values:
            if not is_override(word):
                raise argparse.ArgumentError(self, f"{word!r} is not KEY=VALUE (e.g. stages.seed.train.steps=100)")
        namespace.set = [*(getattr(namespace, "set", None) or []), *values]


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting ``KEY=VALUE`` words also follow options (``plan job.yaml
    --run-dir r a=1``): argparse takes one run of positionals only."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "set"):
        args.set += [word for word in extra if is_override(word)]
        extra = [word for word in extra if not is_override(word)]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    # Choices come from the registries (torch-free tables), so a new entry there is a new choice here.
    from vlcluster.stages.data import DataStage
    from vlcluster.stages.metrics import MetricsStage
    from vlcluster.metrics.correlation import DROP_SCORES
    from vlcluster.sizes import CHECKPOINT_FORMATS, SIZES

    parser = SuggestingParser(prog="vlcluster", description="Multimodal model-merging research pipelines")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", help="pipeline YAML file")
        p.add_argument("overrides", nargs="*", action=PositionalOverrides, metavar="KEY=VALUE",
                       help="override a field as Hydra writes it, e.g. stages.seed.train.steps=100 (same as --set)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. stages.seed.train.steps=100")
        p.add_argument("--run-dir", help="run directory (default: the file's run_dir, or runs/<name>)")

    submit = sub.add_parser("submit", help="run a pipeline (skips finished stages, resumes the rest)")
    spec_args(submit)
    submit.add_argument("--backend", default="local", choices=sorted(BACKENDS), help="where the stages run")
    submit.add_argument("--dry-run", action="store_true", help="show the plan, launch nothing")
    submit.add_argument("--address", help="ray: cluster to join (auto, host:port or http://host:8265); "
                        "default: a local Ray cluster started for the run")
    add_profile_flags(submit, slurm_fields=True)
    submit.set_defaults(func=cmd_submit)

    profiles = sub.add_parser("profiles", help="list the SLURM cluster profiles found and where")
    profiles.set_defaults(func=cmd_profiles)

    render = sub.add_parser("render", help="write what a pipeline becomes on a backend, launching nothing (k8s: KubeRay "
                            "RayCluster + RayJob; slurm: sbatch scripts; ray: Jobs API submissions; local: commands)")
    spec_args(render)
    render.add_argument("--backend", default="k8s", choices=["k8s", *sorted(BACKENDS)], help="what to render for")
    render.add_argument("-o", "--out", help="directory to write to (k8s: one file per object; default: all to stdout)")
    render.add_argument("--profile", help="k8s site profile (default: k8s/profile.yaml)")
    render.add_argument("--validate", action="store_true", help="k8s: check against the Kubernetes and KubeRay schemas (k8s extra)")
    render.set_defaults(func=cmd_render)

    plan = sub.add_parser("plan", help="show the DAG, resources and what would be skipped")
    spec_args(plan)
    add_profile_flags(plan, slurm_fields=False)
    plan.add_argument("--json", action="store_true", help="the plan and its estimates as JSON")
    plan.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation where no measured run gives one "
                      "(default: estimate.DEFAULT_MFU)")
    plan.set_defaults(func=cmd_plan)

    status = sub.add_parser("status", help="state of every stage of a run")
    status.add_argument("run_dir")
    add_watch_flags(status)
    status.set_defaults(func=cmd_status)

    cancel = sub.add_parser("cancel", help="cancel every queued or running job of a run")
    cancel.add_argument("run_dir")
    cancel.set_defaults(func=cmd_cancel)

    logs = sub.add_parser("logs", help="print a stage's log")
    logs.add_argument("run_dir")
    logs.add_argument("stage")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the log until the stage has ended")
    logs.add_argument("--interval", type=float, default=1.0, help="seconds between looks (-f)")
    logs.set_defaults(func=cmd_logs)

    schema = sub.add_parser("schema", help="print the JSON schema of pipeline files")
    schema.set_defaults(func=cmd_schema)

    merge = sub.add_parser("merge", help="merge a modality-specific checkpoint into a modality-agnostic one")
    merge.add_argument("source", help="stage or converted directory, checkpoints/step_N, or the model.safetensors of one")
    merge.add_argument("-o", "--out", required=True, help="output directory")
    add_method_flags(merge)
    merge.add_argument("--base", help="seed checkpoint (W0): stage directory or .safetensors file")
    merge.add_argument("--grams", help="grams stage directory or its grams.safetensors")
    merge.set_defaults(func=cmd_merge)

    metrics = sub.add_parser("metrics", help="mergeability metrics (L2, cosine, SSD, TSSD) of a checkpoint")
    metrics.add_argument("checkpoint", help="stage or converted directory, checkpoints/step_N, or the model.safetensors of one")
    metrics.add_argument("--density", type=float, default=MetricsStage.model_fields["density"].default,
                         help="TSSD: fraction kept by magnitude")
    metrics.add_argument("--checkpoints", action="store_true",
                         help="distances along training: one row per checkpoints/step_N of the stage directory given")
    metrics.add_argument("--figure", metavar="PNG", help="with --checkpoints: also draw the distances per step into this PNG file")
    metrics.add_argument("--json", action="store_true")
    metrics.set_defaults(func=cmd_metrics)

    report = sub.add_parser("report", help="the paper's tables and figures from run directories (-o), or Pearson r of named stages")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("-o", "--out", help="write report.md and PNG figures over every eval stage of the runs here")
    report.add_argument("--metrics", default="metrics", help="metrics stage name in each run")
    report.add_argument("--merged", default="eval_merged", help="eval stage of the merged model")
    report.add_argument("--unmerged", default="eval_msa", help="eval stage of the unmerged model")
    report.add_argument("--score", default="retrieval", choices=list(DROP_SCORES))
    report.set_defaults(func=cmd_report)

    convert = sub.add_parser("convert", help="convert a BEiT / ViT / VLMo checkpoint to a vlcluster model, or a vlcluster model to VLMo's layout or a BEiT")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=[f for f in CHECKPOINT_FORMATS if f != "vlcluster"],
                           help="format of SRC")
    direction.add_argument("--to", dest="to_format", choices=["vlmo", "beit"],
                           help="format to write (SRC: a vlcluster model directory); beit: the image route as a transformers BEiT directory")
    convert.add_argument("source", help="checkpoint file or directory (local or s3://)")
    convert.add_argument("-o", "--out", required=True, help="model directory (--from); file (.safetensors, .pt, .ckpt) or directory (--to)")
    convert.add_argument("--size", default="base", choices=SIZES, help="preset for what the checkpoint does not fix (vocabulary, text length)")
    for name in ("heads", "vocab-size", "max-text-len", "vl-layers", "image-size"):
        convert.add_argument(f"--{name}", type=int, default=None, help=f"{name} of the written model (--from; default: from the checkpoint, else --size)")
    convert.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", help="write the synthetic image-text benchmark as WebDataset shards")
    data.add_argument("out")
    for name in ("n_train", "n_val", "shard_size", "image_size", "seed"):  # the data stage's defaults
        data.add_argument(f"--{name.replace('_', '-')}", type=int, default=DataStage.model_fields[name].default)
    data.set_defaults(func=cmd_data)

    index = sub.add_parser("index", help="index WebDataset shards once (item counts, file offsets) for the training loader")
    index.add_argument("shards", nargs="+", help="shard URLs, brace patterns, globs or prefixes ending in /")
    index.add_argument("-o", "--out", default=None, help="the index file (default: shards.vlindex beside the shards, one per directory)")
    index.set_defaults(func=cmd_index)

    from vlcluster.importers.cli import add_import_parser

    add_import_parser(sub)
    return parser


def installed_version() -> str:
    """The version pip recorded for this install (pyproject.toml's, also for an editable install)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vlcluster")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def report_error(message: str) -> int:
    from vlcluster.storage.errors import redact

    errors.print("[red]error:[/] " + escape(redact(message)))
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    from vlcluster.clirecord import record_invocation

    argv = sys.argv[1:] if argv is None else list(argv)
    code = None
    try:
        try:
            try:
                code = run_command(argv)
            finally:  # also after --help and --version, which exit from inside argparse
                sys.stdout.flush()  # output that fit in the buffer meets a closed pipe only here
        except BrokenPipeError:
            code = reader_went_away()
        return code
    except SystemExit as exc:  # --help, --version and usage errors leave argparse this way
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        raise
    finally:  # for the docs check: which commands the tests ran, and how they ended
        record_invocation(argv, code)


def reader_went_away() -> int:
    """The reader closed the pipe (``vlcluster schema | head -1``): it has what it
    wanted, so stop quietly with status 0, as ripgrep does. stdout now points at
    devnull so the interpreter's last flush at exit does not raise again."""
    try:
        stdout = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (an embedding caller's stream): nothing to point
        return EXIT_OK
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stdout)
    os.close(devnull)
    return EXIT_OK


def run_command(argv: list[str]) -> int:
    args = parse_command_line(argv)
    try:
        return args.func(args)
    except (SpecError, FileNotFoundError, ValueError) as exc:
        return report_error(str(exc))
    except BrokenPipeError:
        raise  # not a failure of the command: main() ends quietly
    except Exception as exc:  # a storage failure (credentials, endpoint) is one paragraph, not a traceback
        from vlcluster.storage.errors import explain

        message = explain(exc, getattr(args, "run_dir", None) or getattr(args, "file", "") or "")
        if message is None:
            raise
        return report_error(message)
    except KeyboardInterrupt:
        errors.print("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
