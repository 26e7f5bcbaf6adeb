"""What a submit would do: resolved stages, their state in the run
directory, and the checks that must pass before anything is launched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlcluster.graph import Graph
from vlcluster.stages.rundir import stage_dir
from vlcluster.errors import SpecError
from vlcluster.storage.paths import is_remote, run_path
from vlcluster.train.checkpoint_index import latest_checkpoint


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: str
    deps: tuple[str, ...]
    spec_hash: str
    status: str  # done | stale | resume | new
    resume_step: int | None
    ranks: int
    nodes: int

    @property
    def runs(self) -> bool:
        return self.status != "done"

    def describe(self) -> str:
        if self.status == "resume":
            return f"resume from step {self.resume_step}"
        return {"done": "skip (done)", "stale": "re-run (spec changed)", "new": "run"}[self.status]


def stage_status(run_dir: Path, name: str, spec_hash: str, checkpoint_dir: str | None) -> tuple[str, int | None]:
    directory = stage_dir(run_dir, name)
    done = directory.done_hash()
    if done == spec_hash:
        return "done", None
    checkpoint = latest_checkpoint(run_path(checkpoint_dir) if checkpoint_dir else directory.checkpoints, spec_hash)
    if checkpoint is not None:
        return "resume", checkpoint.step
    return ("stale" if done else "new"), None


def make_plan(graph: Graph, run_dir: Path) -> list[StagePlan]:
    plans = []
    for name in graph.order:
        spec = graph.pipeline.stages[name]
        checkpoint = getattr(spec, "checkpoint", None)
        status, step = stage_status(run_dir, name, graph.hashes[name], checkpoint.dir if checkpoint else None)
        plans.append(
            StagePlan(name, spec.kind, graph.deps[name], graph.hashes[name], status, step,
                      spec.resources.world_size, spec.resources.nodes)
        )
    return plans


def check_inputs(graph: Graph, source: str, include_remote: bool) -> None:
    """Shards and tokenizers named directly in the spec must exist before
    anything runs (outputs of upstream stages are checked by those stages).
    Remote ones are checked only with ``include_remote`` (submit, not plan):
    their bucket must exist and the credentials must work."""
    problems = []
    for name, spec in graph.pipeline.stages.items():
        data = getattr(spec, "data", None)
        if data is None or data.from_ is not None:
            continue
        for field in ("train", "val", "tokenizer", "answers"):
            value = data.train_patterns() if field == "train" else getattr(data, field)  # every source of a mixture
            try:
                problem = _missing_input(value, f"stages.{name}.data.{field}", include_remote)
            except SpecError as exc:  # storage unusable (bucket, credentials, endpoint): name the file too
                raise type(exc)(f"{source}: {exc}") from None
            if problem:
                problems.append(problem)
    if problems:
        raise SpecError(f"{source}: missing input files:\n  " + "\n  ".join(problems))


def _missing_input(pattern: str | list[str] | None, field: str, include_remote: bool) -> str | None:
    from vlcluster.storage.errors import check_bucket, storage_errors
    from vlcluster.storage.shardlist import expand, missing, needs_listing

    patterns = [pattern] if isinstance(pattern, str) else list(pattern or [])
    patterns = [p for p in patterns if include_remote or not is_remote(p)]
    if not patterns:
        return None
    with storage_errors(patterns[0]):
        for url in patterns:
            check_bucket(url, field)
        try:
            # plan lists nothing: a glob or prefix (``/**/*.tar``) could walk a
            # whole file system; submit lists it once.
            urls = expand(patterns) if include_remote else [
                url for url in expand(patterns, listing=False) if not needs_listing(url)
            ]
        except FileNotFoundError as exc:  # a glob or prefix that matches nothing
            return f"{field}: {exc}"
        except ValueError as exc:  # a brace range too large to expand
            return f"{field}: {exc}"
        except OSError as exc:  # e.g. a directory this user may not list
            return f"{field}: {exc.strerror or exc} ({exc.filename or patterns[0]})"
        try:
            absent = missing(urls)
        except OSError as exc:
            return f"{field}: {exc.strerror or exc} ({exc.filename or urls[0]})"
    if not absent:
        return None
    if len(urls) == 1:
        return f"{field}: file not found: {absent[0]}"
    return f"{field}: {len(absent)} of {len(urls)} shard files missing (first: {absent[0]})"
