"""Before anything is queued: every input a pipeline names exists and can be
read from the submitting host, and every problem is reported at once.

Checked, per stage (sweep copies each): references to other stages (a
known stage of a kind that makes what is read), the SLURM profile (slurm
backend), ``init.checkpoint`` and an eval's ``model_file``, an import's inputs (files readable,
directories listable) and tokenizer, a data section's shard patterns
(``train``, ``val``; a glob or prefix listed once), ``tokenizer`` and
``answers``. Object-store URLs (with ``include_remote``: submit, not a dry
run) need their bucket to exist and the credentials to be accepted, asked
once per bucket. Each problem is one line naming the stage and field; a
found problem never hides the next.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vlcluster.hub import is_hub
from vlcluster.errors import SpecError
from vlcluster.storage.paths import is_remote


class Preflight:
    def __init__(self, include_remote: bool):
        self.include_remote = include_remote
        self.buckets: dict[str, str | None] = {}  # bucket URL -> its problem (None: usable), asked once

    def bucket_problem(self, url: str, field: str) -> str | None:
        from vlcluster.storage.errors import bucket_of, check_bucket

        key = str(url).split("://", 1)[0] + "://" + bucket_of(str(url))
        if key not in self.buckets:
            try:
                check_bucket(url, field)
                self.buckets[key] = None
            except SpecError as exc:  # StorageError: missing bucket, wrong credentials, endpoint down
                self.buckets[key] = str(exc).removeprefix(f"{field}: ")
        problem = self.buckets[key]
        return f"{field}: {problem}" if problem else None

    def path_problem(self, value: str, field: str, directory: bool | None = None) -> str | None:
        """A file (``directory`` False), a directory (True) or either (None) exists and can be read."""
        if is_remote(value):
            if not self.include_remote:
                return None
            return self.bucket_problem(value, field) or self.remote_missing(value, field)
        path = Path(value)
        if not path.exists():
            return f"{field}: no such file or directory: {value}"
        try:
            if path.is_dir():
                if directory is False:
                    return f"{field}: {value} is a directory; a file is expected"
                next(os.scandir(path), None)  # listable
            else:
                if directory:
                    return f"{field}: {value} is a file; a directory is expected"
                with path.open("rb") as handle:
                    handle.read(1)
        except OSError as exc:
            return f"{field}: cannot read {value}: {exc.strerror or exc}"
        return None

    @staticmethod
    def remote_missing(url: str, field: str) -> str | None:
        import fsspec

        from vlcluster.storage.errors import storage_errors

        try:
            with storage_errors(url):
                if not fsspec.filesystem(url.split("://", 1)[0]).exists(url):
                    return f"{field}: no such object or prefix: {url}"
        except SpecError as exc:
            return f"{field}: {exc}"
        return None

    def shards_problem(self, patterns: list[str], field: str) -> str | None:
        from vlcluster.plan import _missing_input

        remote = [p for p in patterns if is_remote(p)]
        if remote and self.include_remote:
            for url in remote:
                if problem := self.bucket_problem(url, field):
                    return problem
        try:
            return _missing_input(patterns, field, self.include_remote)
        except SpecError as exc:
            return f"{field}: {exc}"


# The weight files a checkpoint directory holds (model/external.py's WEIGHT_FILES; not imported: torch).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def weights_problem(checkpoint: str, field: str) -> str | None:
    """A local checkpoint directory (a converted model, a transformers download) holds its weights."""
    path = Path(checkpoint)
    if is_remote(checkpoint) or not path.is_dir() or any((path / name).is_file() for name in WEIGHT_FILES):
        return None
    return f"{field}: {checkpoint} holds no {' or '.join(WEIGHT_FILES)}"


def hub_problem(value: str, field: str) -> str | None:
    """An ``hf://`` reference resolves (from the cache under HF_HUB_OFFLINE=1, else the Hub): once, here."""
    from vlcluster.hub import resolve

    try:
        resolve(value, field)
    except SpecError as exc:
        return str(exc)
    return None


def stage_problems(name: str, stage, check: Preflight) -> list[str]:
    where = f"stages.{name}"
    found: list[str | None] = []
    init = getattr(stage, "init", None)
    if init is not None and is_hub(init.checkpoint):
        found.append(hub_problem(init.checkpoint, f"{where}.init.checkpoint"))
    elif init is not None and init.checkpoint:
        found.append(check.path_problem(init.checkpoint, f"{where}.init.checkpoint") or weights_problem(init.checkpoint, f"{where}.init.checkpoint"))
    if stage.kind == "eval" and stage.model_file:
        field = f"{where}.model_file"
        found.append(check.path_problem(stage.model_file, field) or weights_problem(stage.model_file, field))
    if stage.kind == "import":
        from vlcluster.importers.registry import FORMATS

        kinds = {i.name: i.directory for i in FORMATS[stage.format].inputs}
        for key, value in stage.inputs.items():
            values = [value] if isinstance(value, str) else value
            for index, item in enumerate(values):
                label = f"{where}.inputs.{key}" + (f"[{index}]" if not isinstance(value, str) else "")
                found.append(check.path_problem(item, label, kinds.get(key)))
        if isinstance(stage.tokenizer, str):
            found.append(check.path_problem(stage.tokenizer, f"{where}.tokenizer", directory=False))
    data = getattr(stage, "data", None)
    if data is not None and data.from_ is None:
        for field in ("train", "val"):
            patterns = data.train_patterns() if field == "train" else ([data.val] if isinstance(data.val, str) else data.val or [])
            if patterns:
                found.append(check.shards_problem(list(patterns), f"{where}.data.{field}"))
        for field in ("tokenizer", "answers"):
            if field == "tokenizer" and is_hub(data.tokenizer):
                found.append(hub_problem(data.tokenizer, f"{where}.data.tokenizer"))
            elif getattr(data, field):
                found.append(check.path_problem(getattr(data, field), f"{where}.data.{field}", directory=False))
    return [problem for problem in found if problem]


def profile_problems(pipeline, backend: str) -> list[str]:
    if backend != "slurm":
        return []
    from vlcluster.backends.slurm.profile import load_profile, profile_name

    problems = []
    for name, stage in pipeline.stages.items():
        try:
            load_profile(profile_name(stage))
        except SpecError as exc:
            problems.append(f"stages.{name}.resources.profile: {exc}")
    return problems


def preflight(pipeline, source: str, backend: str, include_remote: bool,
              adjust: Callable[[object], None] = lambda pipeline: None) -> list[str]:
    """Every problem of the pipeline's inputs (empty: nothing stops a submit). ``adjust``
    applies command-line changes (``--profile``) to the expanded pipeline first."""
    from vlcluster.graph import reference_problems
    from vlcluster.jobspec.sweep import expand_sweeps

    expanded = expand_sweeps(pipeline, source)
    adjust(expanded)
    problems = reference_problems(expanded)[1] + profile_problems(expanded, backend) + tracking_problems(pipeline)
    check = Preflight(include_remote)
    return problems + collapse_copies({name: stage_problems(name, stage, check) for name, stage in expanded.stages.items()})


def tracking_problems(pipeline) -> list[str]:
    """The tracking clients are importable here (a stage would otherwise stop at its start)."""
    from vlcluster.extras import require

    problems = []
    for service in ("wandb", "mlflow"):
        if pipeline.tracking is not None and getattr(pipeline.tracking, service) is not None:
            try:
                require(service, f"tracking.{service}")
            except SpecError as exc:
                problems.append(str(exc))
    return problems


def collapse_copies(per_stage: dict[str, list[str]]) -> list[str]:
    """The same problem in every copy of a swept stage is one line: ``stages.seed[4 copies].data.tokenizer: ...``."""
    from vlcluster.jobspec.sweep import sweep_base

    grouped: dict[tuple[str, str], list[str]] = {}
    for name, lines in per_stage.items():
        for line in lines:
            grouped.setdefault((sweep_base(name), line[len(f"stages.{name}"):]), []).append(name)
    return [f"stages.{names[0]}{rest}" if len(names) == 1 else f"stages.{base}[{len(names)} copies]{rest}"
            for (base, rest), names in grouped.items()]


def problems_paragraph(source: str, problems: list[str]) -> str:
    return f"{source}: {len(problems)} problem(s) with the inputs:\n  " + "\n  ".join(problems)
