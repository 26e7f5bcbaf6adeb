"""Object-store failures as one-paragraph errors, checks before anything
runs, and redaction of credentials from text shown to users."""

from __future__ import annotations

import errno
import os
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlcluster.errors import SpecError
from vlcluster.storage.config import active
from vlcluster.storage.paths import is_remote
from vlcluster.storage.retries import outage_note

STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s'\"]+@", re.IGNORECASE)


class StorageError(SpecError):
    """Storage that cannot be used as configured; the message is for the user (exit 2)."""


def redact(text: str) -> str:
    """``text`` without URL user info and without the values of credential variables."""
    text = URL_USERINFO.sub(r"\1***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{name}>")
    return text


def _credential_source() -> str:
    spec = active()
    if spec.anon:
        return "anonymous access (storage.anon)"
    if spec.profile:
        return f"profile {spec.profile!r} (storage.profile)"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment"
    if os.environ.get("AWS_PROFILE"):
        return f"profile {os.environ['AWS_PROFILE']!r} (AWS_PROFILE)"
    return "botocore's default chain (no AWS_* variables set, no storage.profile)"


def _endpoint() -> str:
    return active().endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "the default AWS endpoint"


# A full disk (or a quota, a file-size limit, a read-only mount): not a bug,
# nothing to debug in a traceback; the user frees space and resubmits.
DISK_FULL = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file system or the process's file-size limit",
             errno.EROFS: "read-only file system"}


def disk_full(exc: BaseException) -> str | None:
    """One paragraph for a write that failed for lack of space, or None.
    Looks through chained exceptions (a failed write, then a failed close)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            target = seen.filename or "a file"
            return (
                f"{target}: {DISK_FULL[seen.errno]} ({errno.errorcode[seen.errno]}). Nothing partial was left "
                "under a final name; finished stages and committed checkpoints are kept. Free space (or point "
                "the run directory elsewhere) and run the same command again to continue."
            )
        seen = seen.__context__
    return None


def explain(exc: BaseException, url: str) -> str | None:
    """One paragraph for a storage failure on ``url``, or None if ``exc`` is not one."""
    if (full := disk_full(exc)) is not None:
        return full
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    text = str(exc)
    where = f"{redact(url)} (endpoint {redact(_endpoint())}, credentials: {_credential_source()})"
    if name in {"NoCredentialsError", "PartialCredentialsError"}:
        return f"{where}: no credentials found. Set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or storage.profile, or storage.anon: true for a public bucket"
    if name == "ProfileNotFound":
        return f"{where}: the profile does not exist in ~/.aws/config or ~/.aws/credentials"
    if isinstance(exc, FileNotFoundError) or not (module.startswith(STORAGE_MODULES) or _raised_in_storage_client(exc)):
        return None  # a missing object is the caller's to explain; a local PermissionError is not a storage error
    if isinstance(exc, PermissionError) or any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")):
        return f"{where}: access denied; the credentials are wrong or lack permission for this bucket"
    retried = outage_note(active().max_attempts)
    if name in {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError"}:
        return f"{where}: cannot reach the storage endpoint ({name}){retried}; check storage.endpoint_url and the network"
    return f"{where}: storage request failed: {redact(text).rstrip('.')}{retried}"


def _raised_in_storage_client(exc: BaseException) -> bool:
    """s3fs raises builtin exceptions (PermissionError, FileNotFoundError, OSError)."""
    return any(
        f"{os.sep}{name}{os.sep}" in frame.f_code.co_filename
        for frame, _ in traceback.walk_tb(exc.__traceback__)
        for name in STORAGE_MODULES
    )


@contextmanager
def storage_errors(url: str | os.PathLike) -> Iterator[None]:
    """Turn storage failures inside the block into :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated or re-raised unchanged
        message = explain(exc, str(url))
        if message is None:
            raise
        raise StorageError(message) from None


def bucket_of(url: str) -> str:
    return str(url).split("://", 1)[1].split("/", 1)[0]


def check_bucket(url: str | os.PathLike, field: str) -> None:
    """The bucket of ``url`` exists and the credentials are accepted.
    vlcluster never creates buckets: a typo must not become a new bucket."""
    if not is_remote(url):
        return
    import fsspec

    from vlcluster.extras import require

    active()
    scheme = str(url).split("://", 1)[0]
    if scheme == "s3":
        require("s3fs", f"{field} {url}")
    bucket = bucket_of(str(url))
    fs = fsspec.filesystem(scheme)
    with storage_errors(url):
        try:
            fs.info(bucket)  # one HEAD of the bucket (a listing could page through a huge bucket)
        except FileNotFoundError:
            raise StorageError(
                f"{field}: bucket {bucket!r} of {redact(str(url))} does not exist at {redact(_endpoint())} "
                "(create it first; vlcluster never creates buckets)"
            ) from None


def check_run_dir(run_dir: Path, source: str) -> None:
    """Before anything runs: a remote run directory's bucket exists and is readable."""
    check_bucket(run_dir, f"{source}: run_dir {redact(str(run_dir))}")
