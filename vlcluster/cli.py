"""``vlcluster``: submit, plan, render, status, logs, cancel, schema, merge, metrics, report, data."""

from __future__ import annotations

import argparse
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
    from vlcluster.plan import check_inputs, make_plan

    graph, run_dir = load_graph_from_file(args.file, args.set, args.run_dir)
    print_plan(graph, make_plan(graph, run_dir), run_dir)
    for line in resolved_details(graph):
        console.print(f"  {escape(line)}")  # sweep elements are named stage[key=value]
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
        sys.stdout.write(backend.render(graph, plans, run_dir))  # e.g. the sbatch scripts of the slurm backend
        return 0
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


def load_run(run_dir_arg: str):
    """The run's graph, plans and stage records (``state.json``)."""
    from vlcluster.context import load_graph
    from vlcluster.plan import make_plan
    from vlcluster.rundir import stage_dir
    from vlcluster.storage.paths import run_path

    run_dir = run_path(run_dir_arg)
    graph = load_graph(run_dir)
    plans = make_plan(graph, run_dir)
    return run_dir, graph, plans, {plan.name: stage_dir(run_dir, plan.name).read_state() for plan in plans}


def cmd_status(args) -> int:
    from vlcluster.backends.status import run_status
    from vlcluster.storage.errors import redact

    run_dir, graph, plans, records = load_run(args.run_dir)
    table = Table(title=f"{graph.pipeline.name} ({redact(str(run_dir))})", title_justify="left")
    for column in ("stage", "kind", "job", "state", "detail"):
        table.add_column(column)
    for plan, status in zip(plans, run_status(graph, plans, records, run_dir).values()):
        table.add_row(escape(plan.name), plan.kind, status.job, status.state, escape(status.detail))
    console.print(table)
    return 0


def cmd_logs(args) -> int:
    from vlcluster.backends import get_backend
    from vlcluster.backends.status import backend_of
    from vlcluster.rundir import stage_dir
    from vlcluster.storage.paths import run_path

    run_dir = run_path(args.run_dir)
    record = stage_dir(run_dir, args.stage).read_state()
    sys.stdout.write(get_backend(backend_of(record)).logs(run_dir, args.stage, record))
    return 0


def cmd_cancel(args) -> int:
    """Cancel every queued or running job of a run (slurm, ray), or the running
    stage of a local submit."""
    from collections import defaultdict

    from vlcluster.backends import get_backend
    from vlcluster.backends.status import backend_of
    from vlcluster.rundir import stage_dir

    run_dir, _, plans, records = load_run(args.run_dir)
    by_backend: dict[str, dict[str, dict]] = defaultdict(dict)
    for plan in plans:
        if plan.status != "done":
            by_backend[backend_of(records[plan.name])][plan.name] = records[plan.name]
    cancelled = [name for backend, group in by_backend.items() for name in get_backend(backend).cancel(run_dir, group)]
    for name in cancelled:
        stage_dir(run_dir, name).write_state(state="cancelled", cancelled=time.time())
    console.print(escape(f"cancelled {len(cancelled)} stage(s)" + (f": {', '.join(cancelled)}" if cancelled else "")))
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
    if args.out and not args.out.endswith("/" + INDEX_NAME):
        console.print(f"the training loader looks for {INDEX_NAME} beside the shards: put it there to use it")
    return 0


def cmd_convert(args) -> int:
    from vlcluster.model.external import convert_to_model_dir, export_vlmo

    if args.to_format:
        report = export_vlmo(args.source, args.out)
    else:
        names = ("heads", "vocab_size", "max_text_len", "vl_layers")
        overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        report = convert_to_model_dir(args.source, args.from_format, args.out, args.size, **overrides)
    for line in report.lines():
        console.print(escape(line))
    console.print(f"wrote {args.out}")
    return 0


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
    return 0


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
    if role in {"source", "--base"} and not (path.parent / "model.json").is_file():  # merge reads the config
        raise SpecError(f"{argument}: {role}: no model.json beside it, so the model's configuration (arch, size, "
                        "layers) is unknown; pass the stage directory that vlcluster wrote, or put its model.json next to the file")
    return path


def cmd_metrics(args) -> int:
    import json

    from vlcluster.metrics.distance import checkpoint_distances
    from vlcluster.metrics.stage import format_metrics
    from vlcluster.storage.paths import local_copy

    path = checkpoint_path(args.checkpoint, "checkpoint")
    result = checkpoint_distances(local_copy(path if path.name.endswith(".safetensors") else path / "model.safetensors"), args.density)
    print(json.dumps(result, indent=2) if args.json else format_metrics(result))
    return 0


def cmd_report(args) -> int:
    if args.out:
        return write_study(args)
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


def write_study(args) -> int:
    from vlcluster.storage.paths import run_path
    from vlcluster.study import write_study_report

    report = write_study_report(args.run_dirs, run_path(args.out), args.score)
    console.print(escape(report.summary))
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
    merge.add_argument("source", help="stage directory (model.safetensors + model.json) or a .safetensors file with model.json beside it")
    merge.add_argument("-o", "--out", required=True, help="output directory")
    add_method_flags(merge)
    merge.add_argument("--base", help="seed checkpoint (W0): stage directory or .safetensors file")
    merge.add_argument("--grams", help="grams stage directory or its grams.safetensors")
    merge.set_defaults(func=cmd_merge)

    metrics = sub.add_parser("metrics", help="mergeability metrics (L2, cosine, SSD, TSSD) of a checkpoint")
    metrics.add_argument("checkpoint", help="model.safetensors or a stage directory")
    metrics.add_argument("--density", type=float, default=0.5, help="TSSD: fraction kept by magnitude")
    metrics.add_argument("--json", action="store_true")
    metrics.set_defaults(func=cmd_metrics)

    report = sub.add_parser("report", help="the paper's tables and figures from run directories (-o), or Pearson r of named stages")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("-o", "--out", help="write report.md and PNG figures over every eval stage of the runs here")
    report.add_argument("--metrics", default="metrics", help="metrics stage name in each run")
    report.add_argument("--merged", default="eval_merged", help="eval stage of the merged model")
    report.add_argument("--unmerged", default="eval_msa", help="eval stage of the unmerged model")
    report.add_argument("--score", default="retrieval", choices=["retrieval", "tr", "ir", "vqa_acc"])
    report.set_defaults(func=cmd_report)

    convert = sub.add_parser("convert", help="convert a BEiT / VLMo checkpoint to a vlcluster model, or a vlcluster model to VLMo's layout")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_format", choices=["beit", "vlmo"], help="format of SRC")
    direction.add_argument("--to", dest="to_format", choices=["vlmo"], help="format to write (SRC: a vlcluster model directory)")
    convert.add_argument("source", help="checkpoint file or directory (local or s3://)")
    convert.add_argument("-o", "--out", required=True, help="model directory (--from); file (.safetensors, .pt, .ckpt) or directory (--to)")
    convert.add_argument("--size", default="base", choices=["tiny", "vit_tiny", "base"], help="preset for what the checkpoint does not fix (vocabulary, text length)")
    for name in ("heads", "vocab-size", "max-text-len", "vl-layers"):
        convert.add_argument(f"--{name}", type=int, default=None, help=f"{name} of the written model (--from; default: from the checkpoint, else --size)")
    convert.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", help="write the synthetic image-text benchmark as WebDataset shards")
    data.add_argument("out")
    data.add_argument("--n-train", type=int, default=20000)
    data.add_argument("--n-val", type=int, default=500)
    data.add_argument("--shard-size", type=int, default=2000)
    data.add_argument("--image-size", type=int, default=32)
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=cmd_data)

    index = sub.add_parser("index", help="index WebDataset shards once (item counts, file offsets) for the training loader")
    index.add_argument("shards", nargs="+", help="shard URLs, brace patterns, globs or prefixes ending in /")
    index.add_argument("-o", "--out", default=None, help="the index file (default: shards.vlindex beside the shards, one per directory)")
    index.set_defaults(func=cmd_index)

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
