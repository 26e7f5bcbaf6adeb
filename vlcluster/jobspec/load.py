"""Load a pipeline file: safe YAML, ``--set`` overrides, strict validation.

Every failure becomes a :class:`SpecError` whose message names the file and
the field path, so the CLI can print one paragraph instead of a traceback.
"""

from __future__ import annotations

import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from vlcluster.errors import SpecError
from vlcluster.stages.kinds import STAGE_KINDS
from vlcluster.jobspec.pipeline import Pipeline
from vlcluster.jobspec.names import name_problem
from vlcluster.suggest import did_you_mean


# Bounds on what a job file may expand to. Real pipelines are a few hundred
# nodes, a dozen levels deep, a few KiB.
MAX_FILE_BYTES = 1 << 20
MAX_NODES = 200_000
MAX_DEPTH = 64


class DocumentTooLarge(ValueError):
    pass


class ReadBudget:
    """Counts the nodes of a document as it is copied and refuses too many or too deep."""

    def __init__(self, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH):
        self.left, self.max_nodes, self.max_depth = max_nodes, max_nodes, max_depth

    def count(self, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise DocumentTooLarge(
                f"the document expands to more than {self.max_nodes} values (YAML aliases repeated too often?)"
            )
        if depth > self.max_depth:
            raise DocumentTooLarge(f"nested too deeply (at most {self.max_depth} levels)")


class DuplicateKey(yaml.YAMLError):
    pass


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML says
    keys are unique; PyYAML silently keeps the last, so a second ``data:``
    stage would replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML reports it below
                continue
            if first is not None:
                raise DuplicateKey(
                    f"key {str(key)[:80]!r} appears twice in one mapping "
                    f"(line {first.start_mark.line + 1} and line {key_node.start_mark.line + 1})"
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as YAML
    so ``steps=10`` is an int and ``tasks=[vqa]`` a list."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise SpecError(f"--set {text!r}: expected KEY.PATH=VALUE")
    value = parse_yaml_text(raw, f"--set {path.strip()}") if raw.strip() else ""
    return path.strip().split("."), value


def swept_by(raw: Any, keys: list[str]) -> str | None:
    """Where the file sweeps the field ``keys`` names (a sweep would silently
    replace a ``--set`` value), or None."""
    if not isinstance(raw, dict):
        return None
    field = ".".join(keys)
    top = raw.get("sweep")
    for group in ("zip", "product"):
        fields = top.get(group) if isinstance(top, dict) else None
        if isinstance(fields, dict) and field in fields:
            return f"sweep.{group}"
    stages = raw.get("stages")
    if len(keys) > 2 and keys[0] == "stages" and isinstance(stages, dict):
        stage = stages.get(keys[1])
        own = stage.get("sweep") if isinstance(stage, dict) else None
        if isinstance(own, dict) and ".".join(keys[2:]) in own:
            return f"stages.{keys[1]}.sweep"
    return None


def refuse_swept_override(raw: Any, keys: list[str], path: Path) -> None:
    where = swept_by(raw, keys)
    if where is not None:
        raise SpecError(
            f"{path}: --set {'.'.join(keys)}: the file sweeps this field ({where}), so the sweep's values would "
            f"replace the one given; change the values under {where} in the file instead"
        )


def refuse_misspelt_stages(raw: dict, created: dict[str, str], written: dict, path: Path) -> None:
    """``--set stages.sed.train.steps=5`` would add a stage ``sed`` without a
    kind: name the unknown stage and the closest one instead. (A stage the
    overrides create with its ``kind`` is a new stage, and welcome.)"""
    stages = raw.get("stages")
    for name, override in created.items():
        stage = stages.get(name) if isinstance(stages, dict) else None
        if not isinstance(stage, dict) or "kind" not in stage:
            hint = did_you_mean(name, written) or f"; a new stage needs stages.{name}.kind"
            raise SpecError(f"{path}: --set {override}: no stage {name!r} in this file "
                            f"(stages: {', '.join(map(str, written)) or 'none'}){hint}")


def apply_override(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise SpecError(f"--set {'.'.join(keys)}: {where} is not a mapping")
        node = child
    node[keys[-1]] = value


def format_location(loc: tuple) -> str:
    """Pydantic's location tuple as a dotted path, dropping union tags."""
    parts: list[str] = []
    for index, item in enumerate(loc):
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if index == 2 and item in STAGE_KINDS and loc[0] == "stages":
            continue  # the discriminator tag pydantic inserts after the stage name (not a field named like a kind)
        parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def model_type_at(loc: tuple) -> Any:
    """The type pydantic validated at ``loc`` inside a pipeline, or None where
    it cannot be told (the known names a did-you-mean is drawn from)."""
    node: Any = Pipeline
    for item in loc:
        node = _step(node, item)
        if node is None:
            return None
    return _bare(node)


def _bare(node: Any) -> Any:
    """``X`` of ``Annotated[X, ...]`` and of ``X | None``."""
    while typing.get_origin(node) is typing.Annotated:
        node = typing.get_args(node)[0]
    if typing.get_origin(node) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(node) if member is not type(None)]
        if len(members) == 1:
            return _bare(members[0])
    return node


def _step(node: Any, item: Any) -> Any:
    node = _bare(node)
    origin, args = typing.get_origin(node), typing.get_args(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return next((field.annotation for name, field in node.model_fields.items() if item in (name, field.alias)), None)
    if origin in (typing.Union, types.UnionType):  # pydantic names the member: a stage kind or a class name
        members = [_bare(member) for member in args]
        for member in members:
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and typing.get_args(kind.annotation) == (item,):
                return member
        return next((member for member in members if getattr(member, "__name__", None) == item), None)
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (list, tuple) and args and isinstance(item, int):
        return args[0]
    return None


def known_names(loc: tuple, error_type: str) -> list[str]:
    """What could have been meant at ``loc``: the fields of its model, the values of its Literal."""
    if error_type == "extra_forbidden":
        model = model_type_at(loc[:-1])
        if isinstance(model, type) and issubclass(model, BaseModel):
            return [field.alias or name for name, field in model.model_fields.items()]
    elif error_type == "literal_error":
        literal = model_type_at(loc)
        if typing.get_origin(literal) is typing.Literal:
            return [value for value in typing.get_args(literal) if isinstance(value, str)]
    return []


def describe_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid job spec ({exc.error_count()} error{'s' * (exc.error_count() > 1)}):"]
    for error in exc.errors()[:10]:
        where = format_location(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key" + did_you_mean(error["loc"][-1], known_names(error["loc"], error["type"]))
        elif error["type"] == "literal_error":
            message += did_you_mean(error["input"], known_names(error["loc"], error["type"]))
        elif error["type"] == "union_tag_invalid":
            tag = error.get("ctx", {}).get("tag")
            message = f"unknown stage kind {tag!r}; expected one of {', '.join(STAGE_KINDS)}{did_you_mean(tag, STAGE_KINDS)}"
        elif error["type"] == "union_tag_not_found":
            message = f"missing 'kind' (one of {', '.join(STAGE_KINDS)})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def unshare(node: Any, budget: ReadBudget | None = None, depth: int = 0) -> Any:
    """Copy the YAML tree so that aliases (``*anchor``) become independent
    values: ``--set`` on one stage must not change every stage sharing it.

    The copy is where aliases multiply, so it is bounded: a few hundred bytes
    of nested aliases (a "billion laughs" document) would otherwise expand to
    billions of nodes."""
    budget = budget or ReadBudget()
    budget.count(depth)
    if isinstance(node, dict):
        return {key: unshare(value, budget, depth + 1) for key, value in node.items()}
    if isinstance(node, list):
        return [unshare(value, budget, depth + 1) for value in node]
    return node


def read_yaml(path: Path) -> dict:
    """Parse a job file into plain dicts and lists; every failure is a SpecError naming the file."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read job file ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(f"{path}: job file larger than 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    raw = parse_yaml_text(text, str(path))
    from vlcluster.storage.config import WHERE_CREDENTIALS, secret_comments

    lines = secret_comments(text)
    if lines:  # named by line only: the value is never echoed
        raise SpecError(
            f"{path}: line {', '.join(map(str, lines[:10]))}: a comment looks like it holds a credential "
            f"(a URL with user:password@, or a secret-looking KEY: value); remove it. {WHERE_CREDENTIALS}"
        )
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job file must be a mapping with 'name' and 'stages'")
    return raw


def parse_yaml_text(text: str, source: str) -> Any:
    """Safe YAML with duplicate keys refused and the size of the result bounded."""
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKey as exc:
        raise SpecError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise SpecError(f"{source}: a value cannot be read: {exc}") from None
    try:
        return unshare(raw)
    except DocumentTooLarge as exc:
        raise SpecError(f"{source}: {exc}") from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply (at most {MAX_DEPTH} levels)") from None


def check_values(node: Any, where: str = "") -> list[str]:
    """Numbers every stage can use as given: finite floats, 64-bit integers.
    Checked on the whole document (``x-`` keys and sweep values included)."""
    problems: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            problems.extend(check_values(value, f"{where}.{key}" if where else str(key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            problems.extend(check_values(value, f"{where}[{index}]"))
    elif isinstance(node, float) and not math.isfinite(node):
        problems.append(f"{where or '(top level)'}: {node} is not a finite number")
    elif isinstance(node, int) and not isinstance(node, bool) and not -(2**63) <= node < 2**63:
        problems.append(f"{where or '(top level)'}: integer out of range (64-bit signed)")
    return problems


def check_names(raw: dict) -> list[str]:
    problems: list[str] = []
    if "name" in raw and (problem := name_problem(raw["name"])):
        problems.append(f"name: {problem}")
    stages = raw.get("stages")
    if isinstance(stages, dict):
        problems.extend(f"stages.{key}: stage {problem}" for key in stages if (problem := name_problem(key)))
    return problems


def validate(raw: dict, source: str) -> Pipeline:
    from vlcluster.storage.config import WHERE_CREDENTIALS, secret_fields

    secrets = secret_fields(raw)
    if secrets:  # named by field only: the value is never echoed
        raise SpecError(
            f"{source}: {', '.join(secrets)}: looks like a credential "
            f"(a secret-looking key, or a URL with user:password@); {WHERE_CREDENTIALS}"
        )
    problems = check_values(raw)
    if problems:
        raise SpecError(f"{source}: invalid numbers:\n  " + "\n  ".join(problems[:10]))
    # Top-level "x-" keys hold YAML anchors shared by stages (as in compose files).
    raw = {key: value for key, value in raw.items() if not str(key).startswith("x-")}
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(source, exc)) from None
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply") from None


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    """Read, override and validate a pipeline file (graph checks are separate)."""
    path = Path(path)
    raw = read_yaml(path)
    written = dict(raw["stages"]) if isinstance(raw.get("stages"), dict) else {}
    created: dict[str, str] = {}  # a stage the overrides create -> the first override naming it
    for text in overrides:
        try:
            keys, value = parse_override(text)
            refuse_swept_override(raw, keys, path)
            if keys[0] == "stages" and len(keys) > 1 and keys[1] not in written:
                created.setdefault(keys[1], ".".join(keys))
            apply_override(raw, keys, value)
        except SpecError as exc:  # the override's own message, with the file it applies to
            raise SpecError(str(exc) if str(exc).startswith(f"{path}:") else f"{path}: {exc}") from None
    refuse_misspelt_stages(raw, created, written, path)
    problems = check_names(raw)
    if problems:
        raise SpecError(f"{path}: invalid names:\n  " + "\n  ".join(problems[:10]))
    return validate(raw, str(path))


def validated_yaml(path: str | Path) -> str:
    """The job file as validated: the fields it sets, aliases resolved, ``x-``
    keys and comments gone (what may be published, e.g. in a ConfigMap)."""
    pipeline = load_pipeline(path)
    data = pipeline.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def json_schema() -> str:
    return json.dumps(TypeAdapter(Pipeline).json_schema(by_alias=True), indent=2)
