"""The ``storage:`` section of a pipeline and how it reaches every process.

```yaml
storage:
  endpoint_url: http://127.0.0.1:8333   # S3-compatible server; omit for AWS
  region: us-east-1
  profile: training                     # a profile in ~/.aws/{config,credentials}; or
  anon: false                           # true: unsigned requests (public buckets)
  cache_dir: /scratch/vlcluster-cache   # local copies of shards and run-dir inputs
  cache_limit_gb: 200                   # at most this much of shard copies; least recently used removed
  max_attempts: 5                       # per request, transient errors retried with backoff
```

Nothing here is secret, by construction: keys that look like credentials
and URLs with ``user:password@`` are refused when the job file is loaded.

The section is applied in-process as fsspec's default options for the
``s3`` protocol (so fsspec, s3fs, ``upath.UPath`` and webdataset openers
all use it) and exported as ``VLCLUSTER_STORAGE`` (JSON) so stage processes
started by any backend (subprocess, torchrun ranks, SLURM jobs, which
inherit the submitting environment) apply the same settings before they read
``pipeline.json`` from the run directory.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV = "VLCLUSTER_STORAGE"

# Field names that would hold a credential. A job file is shared, rendered
# into manifests and copied into run directories: it must never carry one.
SECRET_KEY = re.compile(
    r"secret|passw|passphrase|credential|access.?key|api.?key|key.?id|private.?key|^key$|token(?!i[sz]er)"
    r"|^auth(orization|_|$)|bearer|cookie|(^|[_.-])pwd$|^pass$|signature",
    re.IGNORECASE,
)
# A URL carrying a user name (and maybe a password), anywhere in a value or key.
# hf://NAME@REVISION (a Hub model without an organisation, at a revision) has no user part.
USERINFO = re.compile(r"(?<![a-z0-9+.-])(?!hf://[^:/@\s]+@)[a-z][a-z0-9+.-]*://[^/@\s]+@", re.IGNORECASE)
# In comments: a URL with user:password, or ``secret_key: value`` / ``TOKEN=value``.
COMMENT_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)
COMMENT_ASSIGNMENT = re.compile(r"([A-Za-z0-9_.-]+)\s*[:=]\s*['\"]?([^\s'\"]{6,})")
WHERE_CREDENTIALS = (
    "credentials are never read from a job file: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
    "(and AWS_SESSION_TOKEN) in the environment, name a profile with storage.profile, or use the instance's role"
)


class StorageSpec(BaseModel):
    """Where and how object storage is reached; credentials come from the environment."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333 (default: AWS)")
    region: str | None = Field(None, description="region name (default: from the profile/environment)")
    profile: str | None = Field(None, description="named profile in ~/.aws/config and ~/.aws/credentials")
    anon: bool = Field(False, description="unsigned requests (public buckets)")
    cache_dir: str | None = Field(
        None, description="local directory caching shards and run-dir inputs across epochs and requeues (off when unset)"
    )
    cache_limit_gb: float | None = Field(
        None, gt=0, description="at most this many GB of shard copies in cache_dir per node: the least recently used "
        "are removed (unset: no limit)",
    )
    max_attempts: int = Field(
        5, ge=1, le=20, strict=True,
        description="attempts per request; transient errors (resets, timeouts, 5xx, SlowDown) are retried with backoff",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            secret = [str(key) for key in raw if SECRET_KEY.search(str(key))]
            if secret:
                raise ValueError(f"{', '.join(secret)}: {WHERE_CREDENTIALS}")
        return raw

    @field_validator("endpoint_url")
    @classmethod
    def _no_userinfo(cls, url: str | None) -> str | None:
        if url is not None and USERINFO.search(url):
            raise ValueError(f"the URL contains a user name or password; {WHERE_CREDENTIALS}")
        return url

    @model_validator(mode="after")
    def _anon_or_profile(self) -> StorageSpec:
        if self.anon and self.profile:
            raise ValueError("'anon: true' sends unsigned requests; it cannot be combined with 'profile'")
        return self


def secret_fields(node: Any, where: str = "") -> list[str]:
    """Field paths of a raw (YAML) job spec that hold or look like credentials,
    ``x-`` keys included. Only paths are returned: the values must never be printed."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if SECRET_KEY.search(str(key)) or USERINFO.search(str(key)):
                found.append(path if not USERINFO.search(str(key)) else f"{where or '(top level)'}: a key")
            else:
                found.extend(secret_fields(value, path))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(secret_fields(value, f"{where}[{index}]"))
    elif isinstance(node, str) and USERINFO.search(node):
        found.append(where)
    return found


def secret_comments(text: str) -> list[int]:
    """Line numbers of YAML comments that hold what looks like a credential
    (comments are dropped by the parser but travel with the file)."""
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        comment = _comment(line)
        if comment is None:
            continue
        if COMMENT_URL.search(comment) or any(SECRET_KEY.search(m.group(1)) for m in COMMENT_ASSIGNMENT.finditer(comment)):
            lines.append(number)
    return lines


def _comment(line: str) -> str | None:
    """The comment part of a YAML line: a ``#`` at the start or after a blank, outside quotes."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[index + 1 :]
    return None


def s3_options(spec: StorageSpec) -> dict[str, Any]:
    """s3fs constructor options for ``spec``."""
    from vlcluster.storage.retries import retry_config

    client = {key: value for key, value in (("endpoint_url", spec.endpoint_url), ("region_name", spec.region)) if value}
    options: dict[str, Any] = {
        # Listings must be current: another process (a rank, the next job)
        # may have written a checkpoint or done-marker since the last look.
        "use_listings_cache": False,
        "config_kwargs": retry_config(spec.max_attempts),
    }
    if client:
        options["client_kwargs"] = client
    if spec.profile:
        options["profile"] = spec.profile
    if spec.anon:
        options["anon"] = True
    return options


_active: StorageSpec | None = None
_inherited_s3_conf: dict[str, Any] | None = None  # fsspec's own defaults (FSSPEC_S3_* variables), kept under ours


def activate(spec: StorageSpec | None) -> StorageSpec:
    """Use ``spec`` in this process and in every process it starts."""
    import fsspec.config

    import logging

    global _active, _inherited_s3_conf
    if _inherited_s3_conf is None:
        _inherited_s3_conf = dict(fsspec.config.conf.get("s3", {}))
    _active = spec or StorageSpec()
    fsspec.config.conf["s3"] = {**_inherited_s3_conf, **s3_options(_active)}
    use_counting_s3()  # transient errors retried and counted (storage/retries.py)
    os.environ[ENV] = _active.model_dump_json(exclude_defaults=True)
    for name in ("botocore", "aiobotocore", "s3fs"):  # their INFO lines ("Found credentials in ...") are noise in stage logs
        logging.getLogger(name).setLevel(logging.WARNING)
    return _active


def use_counting_s3() -> None:
    """Make ``s3://`` URLs (fsspec, upath, webdataset openers) use the
    counting s3fs filesystem, importing s3fs only when a URL needs it."""
    from fsspec.registry import register_implementation, registry

    target = "vlcluster.storage.s3client.CountingS3FileSystem"
    if "s3" in registry:  # s3fs already imported and registered: replace the class itself
        from vlcluster.storage.s3client import CountingS3FileSystem

        register_implementation("s3", CountingS3FileSystem, clobber=True)
    else:
        register_implementation("s3", target, clobber=True, errtxt="s3:// paths need s3fs: pip install 'vlcluster[s3]'")


def active() -> StorageSpec:
    """The storage settings of this process: those activated, else inherited through ``VLCLUSTER_STORAGE``."""
    if _active is not None:
        return _active
    raw = os.environ.get(ENV)
    return activate(StorageSpec.model_validate(json.loads(raw)) if raw else None)
