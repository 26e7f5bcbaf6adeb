"""Load a pipeline file: safe YAML, ``--set`` overrides, strict validation.

Every failure becomes a :class:`SpecError` whose message names the file and
the field path, so the CLI can print one paragraph instead of a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from vlcluster.jobspec.models import Pipeline

STAGE_KINDS = ("data", "import", "pretrain", "finetune", "grams", "merge", "metrics", "eval", "report")


class SpecError(Exception):
    """A job file that cannot be run; the message is meant for the user."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as YAML
    so ``steps=10`` is an int and ``tasks=[vqa]`` a list."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip():
        raise SpecError(f"--set {text!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return path.strip().split("."), value


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
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if item in STAGE_KINDS and parts[:1] == ["stages"] and len(parts) == 2:
            continue  # the discriminator tag pydantic inserts after the stage name
        parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def describe_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid job spec ({exc.error_count()} error{'s' * (exc.error_count() > 1)}):"]
    for error in exc.errors()[:10]:
        where = format_location(error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "union_tag_invalid":
            message = f"unknown stage kind {error.get('ctx', {}).get('tag')!r}; expected one of {', '.join(STAGE_KINDS)}"
        elif error["type"] == "union_tag_not_found":
            message = f"missing 'kind' (one of {', '.join(STAGE_KINDS)})"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def unshare(node: Any) -> Any:
    """Copy the YAML tree so that aliases (``*anchor``) become independent
    values: ``--set`` on one stage must not change every stage sharing it."""
    if isinstance(node, dict):
        return {key: unshare(value) for key, value in node.items()}
    if isinstance(node, list):
        return [unshare(value) for value in node]
    return node


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read job file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job file must be a mapping with 'name' and 'stages'")
    return unshare(raw)


def validate(raw: dict, source: str) -> Pipeline:
    from vlcluster.storage.config import WHERE_CREDENTIALS, secret_fields

    secrets = secret_fields(raw)
    if secrets:  # named by field only: the value is never echoed
        raise SpecError(
            f"{source}: {', '.join(secrets)}: looks like a credential "
            f"(a secret-looking key, or a URL with user:password@); {WHERE_CREDENTIALS}"
        )
    # Top-level "x-" keys hold YAML anchors shared by stages (as in compose files).
    raw = {key: value for key, value in raw.items() if not str(key).startswith("x-")}
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(describe_validation_error(source, exc)) from None


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> Pipeline:
    """Read, override and validate a pipeline file (graph checks are separate)."""
    path = Path(path)
    raw = read_yaml(path)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return validate(raw, str(path))


def json_schema() -> str:
    return json.dumps(TypeAdapter(Pipeline).json_schema(by_alias=True), indent=2)
