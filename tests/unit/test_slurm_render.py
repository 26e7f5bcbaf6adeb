"""What the SLURM backend would submit, without a cluster: golden sbatch
scripts (as submitit tests its own), the per-node torchrun command for
6 nodes x 8 GPUs, cluster profiles, and sweeps expanded into stages.

Regenerate the golden files after an intended change with
``VLCLUSTER_REGEN_GOLDEN=1 python -m pytest tests/unit/test_slurm_render.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.support.golden import check_golden
from tests.support.jobs import GOOD
from tests.support.jobs import STAGES
from vlcluster.graph import build_graph
from vlcluster.errors import SpecError
from vlcluster.jobspec.load import load_pipeline

RUN_DIR = "/scratch/vl/runs/seed_100k"  # absolute, so the golden file does not depend on the checkout


def dry_run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "vlcluster.cli", "submit", *args, "--backend", "slurm", "--dry-run"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scripts = result.stdout[result.stdout.index("# ---- "):]
    return scripts.replace(sys.executable, "python")


def test_seed_100k_on_v100_golden_sbatch():
    script = dry_run("jobs/seed_100k.yaml", "--run-dir", RUN_DIR)
    check_golden("seed_100k.v100.sbatch", script)
    for line in ("#SBATCH --nodes=6", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=v100:8",
                 "#SBATCH --partition=gpu", "#SBATCH --constraint=volta32gb", "#SBATCH --signal=USR2@180",
                 "#SBATCH --requeue", "#SBATCH --time=2880"):
        assert line in script


def test_quickstart_dry_run_chains_every_stage_with_afterok():
    script = dry_run("jobs/quickstart.yaml", "--run-dir", "/scratch/vl/runs/quickstart")
    assert script.count("#!/bin/bash") == len(STAGES)
    assert "#SBATCH --dependency=afterok:'<job:seed>:<job:data>'" in script or "--dependency='afterok:<job:seed>:<job:data>'" in script
    assert script.count("#SBATCH --kill-on-invalid-dep=yes") == len(STAGES) - 1  # every stage but data


def test_torchrun_command_for_six_nodes_of_eight_gpus(monkeypatch):
    """The command each node's task runs, from a real SLURM environment of
    node 3 of a 6-node allocation (parsed by submitit, as on the cluster)."""
    import submitit

    from vlcluster.backends.slurm.stage import StageJob

    for key, value in {
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "6", "SLURM_NODEID": "3", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "0", "SLURM_NTASKS": "6", "SLURM_JOB_NODELIST": "v100-[017-020,031],v100-040",
        "SUBMITIT_EXECUTOR": "slurm",
    }.items():
        monkeypatch.setenv(key, value)
    job = StageJob("/runs/seed_100k", "seed", "abc", "pretrain", 8, "python")
    assert job.command(submitit.JobEnvironment()) == [
        "python", "-m", "torch.distributed.run", "--nnodes=6", "--node_rank=3", "--nproc_per_node=8",
        "--master_addr=v100-017", "--master_port=24242", "-m", "vlcluster.run", "/runs/seed_100k", "seed",
    ]


def test_profiles_are_validated():
    from vlcluster.backends.slurm.profile import load_profile

    assert load_profile("v100").gpus_per_node == 8
    assert load_profile("local").partition == "debug"
    with pytest.raises(SpecError, match="cluster profile 'nope' not found"):
        load_profile("nope")


def test_a_missing_profile_names_the_job_file_and_the_field(write_job, tmp_path):
    from vlcluster.backends.slurm.backend import SlurmBackend

    path = write_job(GOOD.replace("train: {steps: 2}}\n  vlpt", "train: {steps: 2}, resources: {profile: nope}}\n  vlpt", 1))
    with pytest.raises(SpecError) as info:
        SlurmBackend().validate(build_graph(load_pipeline(path), str(path)), str(path))
    assert str(info.value).startswith(f"{path}: stages.seed.resources.profile: cluster profile 'nope' not found")


def test_more_gpus_than_the_profile_has_is_a_spec_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "vlcluster.cli", "submit", "jobs/seed_100k.yaml", "--backend", "slurm", "--dry-run",
         "--set", "stages.seed.resources.gpus_per_node=16"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert "gpus_per_node is 16; profile 'v100' nodes have 8" in result.stderr


SWEEP = GOOD + """\
  merge: {kind: merge, source: vlpt, sweep: {alpha: [0, 0.5, 1.0]}}
  after_all: {kind: data, n_train: 16, n_val: 8, shard_size: 8, after: [merge]}
"""


def test_sweep_becomes_one_stage_per_value_with_its_own_hash(write_job):
    path = write_job(SWEEP)
    graph = build_graph(load_pipeline(path), str(path))
    elements = ("merge[alpha=0]", "merge[alpha=0.5]", "merge[alpha=1.0]")
    assert graph.order == ("data", "seed", "vlpt", *elements, "after_all")
    assert [graph.pipeline.stages[name].alpha for name in elements] == [0, 0.5, 1.0]
    assert len({graph.hashes[name] for name in elements}) == 3
    assert set(graph.deps["after_all"]) == set(elements)  # downstream waits for the whole sweep


def test_sweep_over_a_nested_field_and_bad_references(write_job):
    path = write_job(SWEEP.replace("sweep: {alpha: [0, 0.5, 1.0]}", "alpha: 0.5")
                     .replace("train: {steps: 2}}\n  vlpt", "train: {steps: 2}, sweep: {train.steps: [5, 10]}}\n  vlpt"))
    with pytest.raises(SpecError, match=r"stage 'seed' is a sweep of 2; name one element, e.g. 'seed\[train.steps=5\]'"):
        build_graph(load_pipeline(path), str(path))
    graph = build_graph(load_pipeline(path, ["stages.vlpt.init.from=seed[train.steps=10]"]), str(path))
    assert graph.pipeline.stages["seed[train.steps=10]"].train.steps == 10
    assert graph.deps["vlpt"] == ("seed[train.steps=10]", "data")
    with pytest.raises(SpecError, match="'resources.nodes' cannot be swept"):
        load_pipeline(path, ["stages.data.sweep={resources.nodes: [1, 2]}"])


def test_sweep_survives_the_run_directory_round_trip(write_job, tmp_path):
    from vlcluster.stages.context import load_graph, save_pipeline

    path = write_job(SWEEP)
    graph = build_graph(load_pipeline(path), str(path))
    save_pipeline(tmp_path, graph)
    again = load_graph(tmp_path)
    assert again.order == graph.order and again.hashes == graph.hashes


HOSTILE = """
name: hostile
stages:
  data: {kind: data, n_train: 32, n_val: 8, shard_size: 16}
  after-1.x: {kind: data, n_train: 32, n_val: 8, shard_size: 16, after: [data]}
"""


def test_every_generated_shell_word_is_quoted_for_a_hostile_run_dir(write_job, tmp_path):
    """Stage names are plain words (the spec refuses anything else), but the
    run directory may hold any character: quoted, it stays one word of the
    script and runs nothing."""
    import shlex

    run_dir = tmp_path / "it's $HOME $(touch pwned) `id`; rm -rf x"
    script = dry_run(str(write_job(HOSTILE)), "--run-dir", str(run_dir))
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
    assert len(srun) == 2
    for line, stage in zip(srun, ("data", "after-1.x")):
        words = shlex.split(line)
        assert words[-1] == str(run_dir / "slurm" / stage)  # the folder submitit's _submit reads
        assert words[words.index("--output") + 1] == str(run_dir / "slurm" / stage / "%j_%t_log.out")
    flags = [shlex.split(line[len("#SBATCH "):]) for line in script.splitlines() if line.startswith("#SBATCH ")]
    assert all(len(words) == 1 for words in flags)  # every sbatch flag one word
    assert "# ---- after-1.x: one job" in script
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()


CAPPED = """
name: capped
limits: {gpus: 32}
sweep:
  zip:
    stages.seed.train.steps: [0, 100, 200, 300]
    stages.vlpt.train.steps: [400, 300, 200, 100]
x-big: &big {nodes: 2, gpus_per_node: 8, profile: v100}
stages:
  seed: {kind: pretrain, data: {train: "/data/shards/{0..3}.tar"}, train: {steps: 1, batch_size: 64}, resources: *big}
  vlpt: {kind: pretrain, model: {arch: specific}, init: {from: seed}, data: {train: "/data/shards/{0..3}.tar"}, train: {steps: 1, batch_size: 64}, resources: *big}
  evals: {kind: pretrain, init: {from: vlpt}, data: {train: "/data/shards/{0..3}.tar"}, train: {steps: 10, batch_size: 64},
          resources: {gpus_per_node: 8, profile: v100, max_concurrent: 1}}
"""


def test_a_gpu_cap_becomes_array_throttles_and_afterany_on_the_slots_golden(write_job):
    """limits.gpus 32 with 16-GPU tasks: two at a time, and a job waits for
    the jobs whose GPUs it takes; max_concurrent 1 serialises its array."""
    script = dry_run(str(write_job(CAPPED)), "--run-dir", "/scratch/vl/runs/capped")
    check_golden("capped.v100.sbatch", script)
    blocks = {block.split(":")[0]: block for block in script.split("# ---- ")[1:]}
    assert "#SBATCH --array=0-3%2" in blocks["seed"] and "#SBATCH --array=0-3%2" in blocks["vlpt"]
    assert "aftercorr:<job:seed>,afterany:<job:seed>" in blocks["vlpt"]
    assert "#SBATCH --array=0-3%1" in blocks["evals"] and "afterany:<job:vlpt>" in blocks["evals"]
    uncapped = dry_run(str(write_job(CAPPED.replace("limits: {gpus: 32}\n", ""))), "--run-dir", "/scratch/vl/runs/capped")
    assert "#SBATCH --array=0-3%4" in uncapped and "afterany" not in uncapped and "%1" in uncapped


def test_a_stage_larger_than_the_cap_is_refused_before_anything_is_queued(write_job):
    result = subprocess.run(
        [sys.executable, "-m", "vlcluster.cli", "submit", str(write_job(CAPPED.replace("gpus: 32", "gpus: 8"))),
         "--backend", "slurm", "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "stage seed[seed.train.steps=0] asks for 16 GPUs; limits.gpus is 8" in result.stderr


def test_command_line_overrides_the_profile_of_every_stage(tmp_path):
    """--profile picks a lab's own profile from $VLCLUSTER_PROFILE_PATH; --partition,
    --account, --qos and --time override what it says."""
    lab = tmp_path / "lab-profiles"
    lab.mkdir()
    (lab / "lab.yaml").write_text("partition: big\naccount: lab-7\ngpus_per_node: 8\ngpu_type: a100\ntime_min: 600\n")
    env = {**os.environ, "VLCLUSTER_PROFILE_PATH": str(lab)}
    listed = subprocess.run([sys.executable, "-m", "vlcluster.cli", "profiles"], capture_output=True, text=True,
                            cwd=REPO, timeout=60, env={**env, "COLUMNS": "300"})
    assert listed.returncode == 0 and f"{lab}/lab.yaml" in listed.stdout and "slurm/v100.yaml" in listed.stdout
    base = [sys.executable, "-m", "vlcluster.cli", "submit", "jobs/seed_100k.yaml", "--backend", "slurm", "--dry-run"]
    script = subprocess.run([*base, "--profile", "lab"], capture_output=True, text=True, cwd=REPO, timeout=120, env=env).stdout
    assert "#SBATCH --account=lab-7" in script and "#SBATCH --gpus-per-node=a100:8" in script and "profile lab)" in script
    script = subprocess.run([*base, "--profile", "lab", "--account", "other", "--partition", "p", "--qos", "q", "--time", "30"],
                            capture_output=True, text=True, cwd=REPO, timeout=120, env=env).stdout
    for line in ("#SBATCH --account=other", "#SBATCH --partition=p", "#SBATCH --qos=q", "#SBATCH --time=30"):
        assert line in script
    assert "--time=2880" not in script  # the stage's own limit is overridden too
    missing = subprocess.run([*base, "--profile", "nowhere"], capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert missing.returncode == 2 and "cluster profile 'nowhere' not found" in missing.stderr and "vlcluster profiles" in missing.stderr


def test_shipped_job_files_and_profiles_name_no_account():
    for path in [*(REPO / "jobs").glob("*.yaml"), *(REPO / "slurm").glob("*.yaml")]:
        for line in path.read_text().splitlines():
            assert not line.split("#")[0].strip().startswith("account:"), f"{path}: {line}"
    v100 = (REPO / "slurm" / "v100.yaml").read_text()
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in v100 and "- export NCCL_ASYNC" not in v100
