"""Watching a run while it runs: ``status --watch --json`` and ``logs -f``
started beside a submit, their output read back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.support import REPO

CHAIN = """
name: watched
stages:
  first: {kind: data, n_train: 16, n_val: 8, shard_size: 16}
  second: {kind: data, n_train: 16, n_val: 8, shard_size: 16, seed: 1, after: [first]}
"""


def vlcluster(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vlcluster.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def json_documents(text: str) -> list[dict]:
    decoder, docs, index = json.JSONDecoder(), [], 0
    while index < len(text.rstrip()):
        doc, index = decoder.raw_decode(text, index)
        docs.append(doc)
        while index < len(text) and text[index].isspace():
            index += 1
    return docs


def watch_while_running(run_dir: Path, submit: subprocess.Popen, stage: str, timeout: float = 120) -> tuple[list[dict], str, int]:
    """Once the run directory exists: ``status --watch --json`` and ``logs -f STAGE`` side by side."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "pipeline.json").is_file():
        assert time.monotonic() < deadline and submit.poll() in (None, 0), submit.communicate()
        time.sleep(0.2)
    watch = vlcluster("status", str(run_dir), "--watch", "--json", "--interval", "0.5")
    logs = vlcluster("logs", str(run_dir), stage, "-f", "--interval", "0.5")
    watched, watch_err = watch.communicate(timeout=timeout)
    followed, logs_err = logs.communicate(timeout=timeout)
    assert watch.returncode == 0, watch_err
    return json_documents(watched), followed, logs.returncode
