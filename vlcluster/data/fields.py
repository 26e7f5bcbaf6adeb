"""Which files of a WebDataset sample hold its image, captions and task fields.

A pre-training or retrieval sample needs an image and at least one caption,
nothing else; ``FieldMap`` says where to find them (``data.fields`` of a job
file). The defaults read shards written by img2dataset (``key.jpg|png|webp``,
``key.txt``, ``key.json`` with ``caption``) and the synthetic benchmark alike.
Task fields (VQA's ``qa``, the benchmark's ``objects``) come from the
sample's JSON: they are required only by a stage that uses them, and passed
along when present otherwise.

A field name is a file extension (``jpg``, ``txt``) or, for a value inside a
JSON file, the extension and a dotted path (``json.caption``, ``json.meta.text``).
A text file holds one caption per line; a JSON value is one caption (a string)
or several (a list of strings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlcluster.data.quality import BAD_TEXT, MISSING_FIELD, BadSample

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("txt", "json.caption")
TASK_FIELDS = ("qa", "objects")  # lists of tuples in the sample's JSON
JSON_FIELD = "json"


@dataclass(frozen=True)
class FieldMap:
    image: tuple[str, ...] = IMAGE_FIELDS
    caption: tuple[str, ...] = CAPTION_FIELDS
    require: frozenset[str] = frozenset()  # task fields this stage cannot do without

    def requiring(self, *fields: str) -> FieldMap:
        unknown = set(fields) - set(TASK_FIELDS)
        if unknown:
            raise ValueError(f"unknown task fields {sorted(unknown)}; known: {list(TASK_FIELDS)}")
        return FieldMap(self.image, self.caption, self.require | frozenset(fields))

    def image_bytes(self, raw: dict[str, Any]) -> bytes:
        for field in self.image:
            if field in raw:
                return raw[field]
        raise BadSample(MISSING_FIELD, f"no image file ({', '.join(self.image)})", cause="missing field image")

    def captions(self, raw: dict[str, Any], meta: dict[str, Any] | None) -> list[str]:
        """The sample's captions from the first caption field it has."""
        for field in self.caption:
            ext, _, path = field.partition(".")
            if path and ext == JSON_FIELD:
                value = _json_path(meta, path)
                if value is not None:
                    return _json_captions(value, field)
            elif field in raw:
                return _text_captions(raw[field], field)
        raise BadSample(MISSING_FIELD, f"no caption ({', '.join(self.caption)})", cause="missing field caption")

    def task_fields(self, meta: dict[str, Any] | None) -> dict[str, list[tuple]]:
        fields = {}
        for name in TASK_FIELDS:
            value = meta.get(name) if meta else None
            if value is None:
                if name in self.require:
                    raise BadSample(MISSING_FIELD, f"no {name!r} in the sample's JSON", cause=f"missing field {name}")
                continue
            try:
                fields[name] = [tuple(item) for item in value]
            except TypeError as exc:
                raise BadSample(BAD_TEXT, f"{name}: {exc}", cause=f"bad field {name}") from None
        return fields

    def needs_json(self) -> bool:
        return bool(self.require) or any(field.startswith(JSON_FIELD + ".") for field in self.caption)


def read_json(raw: dict[str, Any], fields: FieldMap) -> dict[str, Any] | None:
    """The sample's JSON, or None when it has none (or a broken one nobody needs)."""
    if JSON_FIELD not in raw:
        if fields.require:
            missing = sorted(fields.require)[0]
            raise BadSample(MISSING_FIELD, f"no JSON file (needed for {sorted(fields.require)})", cause=f"missing field {missing}")
        return None
    try:
        meta = json.loads(raw[JSON_FIELD])
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if fields.needs_json():
            raise BadSample(BAD_TEXT, f"json: {type(exc).__name__}: {exc}", cause="bad json") from None
        return None
    return meta if isinstance(meta, dict) else None


def _json_path(meta: dict[str, Any] | None, path: str) -> Any:
    value: Any = meta
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _json_captions(value: Any, field: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(text, str) for text in values):
        raise BadSample(BAD_TEXT, f"{field} is neither a string nor a list of strings", cause="bad caption")
    captions = [text.strip() for text in values if text.strip()]
    if not captions:
        raise BadSample(BAD_TEXT, f"{field} is empty", cause="empty caption")
    return captions


def _text_captions(data: bytes, field: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSample(BAD_TEXT, f"{field}: {exc}", cause="caption not UTF-8") from None
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise BadSample(BAD_TEXT, f"{field} is empty", cause="empty caption")
    return captions
