"""Transient object-store errors: retried with backoff, and counted.

botocore retries every request that fails transiently (a connection reset
or refused, a timeout, a 5xx answer, S3's ``503 SlowDown`` throttling) in its
``standard`` mode: exponential backoff with jitter, at most
``storage.max_attempts`` attempts, throttling answers backing off longer.
s3fs, which wraps botocore, keeps one retry round of its own for what
botocore cannot see (a download cut short while its body is read).

Every attempt and every API call of this process is counted through
botocore's events (:mod:`vlcluster.storage.s3client` hooks them in), so a
stage that recovered from a flaky store says so in its log instead of
only being slower: ``storage: 3 requests retried after transient errors
(SlowDown 503 x3); 41 calls, 44 attempts``.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("vlcluster.storage")

S3FS_TRIES = 2  # s3fs's own loop: one more round after botocore's attempts (see the module doc)
THROTTLING_STATUS = {429, 503}


def retry_config(max_attempts: int) -> dict:
    """botocore ``Config`` options: standard retries with at most ``max_attempts`` attempts per request."""
    return {"retries": {"total_max_attempts": max_attempts, "mode": "standard"}}


@dataclass
class RetryCount:
    calls: int = 0  # API calls (one per request the code makes)
    attempts: int = 0  # HTTP attempts (a call retried twice is three)
    failures: Counter = field(default_factory=Counter)  # failed attempts by kind
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def retried(self) -> int:
        return max(self.attempts - self.calls, 0)

    def call(self) -> None:
        with self.lock:
            self.calls += 1

    def attempt(self) -> None:
        with self.lock:
            self.attempts += 1

    def failure(self, kind: str) -> None:
        with self.lock:
            self.failures[kind] += 1

    def summary(self) -> str | None:
        """One line for the stage log, or None when nothing was retried or failed."""
        if not self.retried and not self.failures:
            return None
        kinds = ", ".join(f"{kind} x{count}" for kind, count in self.failures.most_common())
        return (f"storage: {self.retried} requests retried after transient errors ({kinds}); "
                f"{self.calls} calls, {self.attempts} attempts")


COUNT = RetryCount()


def failure_kind(response: tuple | None, caught_exception: BaseException | None) -> str | None:
    """What made an attempt fail transiently (``SlowDown 503``, ``ConnectionClosedError``), or None."""
    if caught_exception is not None:
        return type(caught_exception).__name__
    if not response:
        return None
    http, parsed = response
    status = getattr(http, "status_code", 0)
    if status >= 500 or status in THROTTLING_STATUS:
        code = str((parsed or {}).get("Error", {}).get("Code") or "")
        return f"{code if code and not code.isdigit() else 'HTTP'} {status}"  # a HEAD answer has no body, no code
    return None


def count_events(events) -> None:
    """Count the calls, attempts and failed attempts of a botocore client (its ``meta.events``)."""

    def on_call(**_) -> None:
        COUNT.call()

    def on_send(**_) -> None:
        COUNT.attempt()

    def on_retry_check(response=None, caught_exception=None, **_) -> None:
        kind = failure_kind(response, caught_exception)
        if kind:
            COUNT.failure(kind)

    # Handlers return None: a value from before-send would replace the request.
    events.register("before-call.s3", on_call, unique_id="vlcluster-count-call")
    events.register("before-send.s3", on_send, unique_id="vlcluster-count-send")
    events.register_first("needs-retry.s3", on_retry_check, unique_id="vlcluster-count-retry")
    _log_retries_at_exit()


_registered = False


def _log_retries_at_exit() -> None:
    """Log the summary when the process ends (ranks that leave through
    ``os._exit`` call :func:`log_retries` themselves)."""
    global _registered
    if not _registered:
        _registered = True
        atexit.register(log_retries)


def outage_note(max_attempts: int) -> str:
    """What an error paragraph adds when requests failed transiently: they were retried."""
    if not COUNT.failures:
        return ""
    return (f"; transient failures were retried with backoff, {max_attempts} attempts per request "
            "(storage.max_attempts), and did not clear")


def log_retries() -> None:
    """One warning line with the counts of retried and failed storage requests, if there were any."""
    line = COUNT.summary()
    if line:
        log.warning("%s", line)

