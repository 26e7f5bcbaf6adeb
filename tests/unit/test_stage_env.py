"""The environment every backend gives a stage's processes."""

from __future__ import annotations

import os

from vlcluster.backends.stage_process import child_env, threads_per_rank


def test_a_stage_splits_the_node_cores_between_its_ranks_unless_told(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert child_env("pretrain", 1)["OMP_NUM_THREADS"] == str(cores)
    assert child_env("pretrain", 2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert threads_per_rank(cores * 4) == 1  # more ranks than cores: one thread each, never zero
    assert "OMP_NUM_THREADS" not in child_env("merge", 1)  # one Python process: torch's own default
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's (or the scheduler's) setting is kept
    assert child_env("pretrain", 2)["OMP_NUM_THREADS"] == "3"
