"""The cause of a failed stage, named from real failures: a collective that
times out in a real two-process gloo group, the CPU allocator refusing a
tensor, a rank killed by SIGKILL (as torchrun reports it), and a record of
an earlier attempt that must not be taken for the latest one.

The end-to-end cases are beside their faults: a full disk in
tests/faults/test_disk_full.py, bad data over the limit in tests/e2e/test_e2e_loader.py,
a killed rank in tests/faults/test_kill_resume.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import torch

from vlcluster import failure
from vlcluster.backends.stage_process import rank_exit_codes, record_end
from vlcluster.run_times import stage_seconds
from vlcluster.stages.rundir import StageDir

GLOO_TIMEOUT = textwrap.dedent("""
    import datetime, os, sys, time
    import torch, torch.distributed as dist
    from vlcluster.failure import cause_of
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=1))
    if rank == 1:
        time.sleep(3)  # never joins the all-reduce in time
        os._exit(0)
    try:
        dist.all_reduce(torch.ones(1))
    except BaseException as exc:
        print("CAUSE", cause_of(exc))
    os._exit(0)
""")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_gloo_collective_that_times_out_is_named(tmp_path):
    script = tmp_path / "timeout.py"
    script.write_text(GLOO_TIMEOUT)
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), port], stdout=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [rank.communicate(timeout=60)[0] for rank in ranks]
    assert f"CAUSE ('{failure.COLLECTIVE_TIMEOUT}'," in outputs[0], outputs


def test_the_cpu_allocator_refusing_a_tensor_is_out_of_memory():
    try:
        torch.empty(1 << 50, dtype=torch.uint8)  # a petabyte: refused by the allocator, nothing allocated
    except RuntimeError as exc:
        cause, message = failure.cause_of(exc)
    assert cause == failure.OUT_OF_MEMORY and "allocate" in message


def test_an_error_of_a_lost_peer_is_not_taken_for_the_cause():
    exc = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29400")
    assert failure.cause_of(exc) is None


def test_a_rank_killed_by_sigkill_is_named_from_torchruns_report(tmp_path):
    # the two forms torchrun prints: the first failure it sees and the summary line per rank
    lines = ["[W] failed (exitcode: 1) local_rank: 0 (pid: 11) of binary: python",
             "    exitcode  : -9 (pid: 12)"]
    directory = StageDir(tmp_path / "seed")
    directory.write_state(state="running", started=time.time())
    record_end(directory, 1, started=time.time() - 1, rank_codes=rank_exit_codes(lines))
    state = directory.read_state()
    assert state["state"] == "failed" and state["failure"]["cause"] == failure.KILLED
    assert failure.describe(state["failure"]).startswith("killed by SIGKILL: ")


def test_a_failure_recorded_by_an_earlier_attempt_is_not_reported(tmp_path):
    directory = StageDir(tmp_path / "seed")
    failure.note_failure(directory, OSError(28, "No space left on device", str(tmp_path / "x")))
    recorded = failure.failure_at_end(directory, 1, [])
    assert recorded["cause"] == failure.DISK_FULL and "(ENOSPC)" in recorded["message"]
    failure.begin_attempt(directory)  # the next attempt: the earlier record is gone
    assert failure.failure_at_end(directory, 1, []) is None
    record_end(directory, 0, started=time.time() - 60)
    assert directory.read_state()["failure"] is None  # a success clears it


def test_a_cause_recorded_under_a_clock_that_jumped_back_is_still_reported(tmp_path):
    """Which attempt a record belongs to is not read from clocks: a rank whose
    node's clock jumped back two hours after the attempt began is still heard."""
    directory = StageDir(tmp_path / "seed")
    started = time.time()
    failure.begin_attempt(directory)
    failure.note_failure(directory, OSError(28, "No space left on device", str(tmp_path / "x")))
    record = json.loads(failure.failure_file(directory).read_text())
    failure.failure_file(directory).write_text(json.dumps(record | {"time": started - 7200}))
    record_end(directory, 1, started=started, duration_s=12.5)
    state = directory.read_state()
    assert state["failure"]["cause"] == failure.DISK_FULL
    assert stage_seconds(state | {"ended": started - 7190}, "failed") == 12.5  # not ended - started (negative)


def test_every_backend_shows_the_recorded_cause_of_a_failed_stage(tmp_path):
    """The same ``failure`` record reads the same in the local, SLURM and Ray
    descriptions (the end-to-end runs above cover local and SLURM)."""
    from vlcluster.backends.local import LocalBackend
    from vlcluster.backends.ray.jobs import describe_job as describe_ray_job
    from vlcluster.backends.slurm.jobs import describe_job as describe_slurm_job
    from vlcluster.backends.slurm.jobs import JobState
    from vlcluster.plan import StagePlan

    cause = {"cause": failure.DISK_FULL, "message": "/r/seed/x: no space left on the device (ENOSPC). Free space."}
    plan = StagePlan("seed", "pretrain", (), "h", "resume", None, 2, 1)
    local = LocalBackend().describe([plan], {"seed": {"state": "failed", "returncode": 1, "failure": cause}}, tmp_path)["seed"]
    slurm = describe_slurm_job(plan, {"job_id": "7", "returncode": 1, "failure": cause}, JobState("7", "FAILED", "1:0", "", restarts=3))
    ray = describe_ray_job({"state": "failed", "returncode": 1, "failure": cause}, "FAILED", tmp_path / "stage.log")
    for described in (local, slurm, ray):
        assert described.state == "failed"
        assert described.detail.startswith("disk full: /r/seed/x: no space left on the device (ENOSPC); "), described
        assert "Free space" not in described.detail  # the first sentence only: the paragraph is in the log
    assert "requeued 3x" in slurm.detail  # preempted (or timed out) three times before it failed
