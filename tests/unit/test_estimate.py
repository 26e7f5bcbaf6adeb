"""What `plan` says a study costs: GPU-hours against the README's hand
calculation, MFU from a measured run, the critical path, and the slots that
hold a pipeline to `limits.gpus` whatever the real durations are."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from tests.support import REPO
from vlcluster.estimate import DEFAULT_MFU, estimate, summary
from vlcluster.graph import build_graph
from vlcluster.errors import SpecError
from vlcluster.jobspec.load import load_pipeline
from vlcluster.schedule import CapError, Job, critical_path, families, shape_for_cap


def plan_json(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "vlcluster.cli", "plan", *args, "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def readme_hand_total() -> float:
    match = re.search(r"\*\*([\d,]+) V100-hours\*\*", (REPO / "docs" / "guide" / "study.md").read_text())
    assert match, "docs/guide/study.md: the hand calculation's total is gone"
    return float(match.group(1).replace(",", ""))


def test_paper_recipe_total_is_within_ten_percent_of_the_readme_hand_calculation():
    plan = plan_json("jobs/paper_recipe.yaml", "--set", "limits.gpus=96")
    total = plan["total"]
    assert total["gpu_hours"] == pytest.approx(readme_hand_total(), rel=0.10)
    assert total["gpus"] == ["Tesla V100-SXM2-32GB"] and total["mfu_sources"] == ["default"]
    seed = next(stage for stage in plan["stages"] if stage["name"] == "seed[seed.train.steps=100000]")["estimate"]
    assert seed["gpus"] == 48 and seed["mfu"] == DEFAULT_MFU
    # 229 GFLOP x 100k x 1024 samples at 48 x 125 TFLOP/s x 0.30: the README's step by step
    assert seed["wall_hours"] == pytest.approx(229e9 * 100_000 * 1024 / (48 * 125e12 * 0.30) / 3600, rel=0.01)
    unlimited, capped = total["critical_path"]["hours"], total["limits"]["hours"]
    assert total["limits"]["gpus"] == 96
    assert 0 < unlimited < capped  # 96 GPUs cannot run the 48-GPU stages all at once
    assert capped >= total["gpu_hours"] / 96  # nor do better than perfect packing
    assert total["unestimated_gpu_hours_bound"]["kinds"] == {"eval": 72, "grams": 1}


JOB = """
name: est
stages:
  seed:
    kind: pretrain
    model: {size: base, image_size: 224, max_text_len: 40}
    data: {train: "shards/{0..3}.tar"}
    train: {steps: 1000, batch_size: 256, precision: fp16, device: cuda}
    resources: {nodes: 2, gpus_per_node: 8, profile: v100}
  ft:
    kind: finetune
    task: vqa
    init: {from: seed}
    model: {size: base, image_size: 480, max_text_len: 40}
    data: {train: "shards/{0..3}.tar"}
    train: {steps: 100, batch_size: 64, precision: fp16, device: cuda}
    resources: {gpus_per_node: 8, profile: v100}
  cpu: {kind: pretrain, data: {train: "shards/{0..3}.tar"}, train: {steps: 5}, after: [ft]}
"""


def write_measured_stage(run_dir, name: str, image_size: int, mfu: float, device: str = "Tesla V100-SXM2-32GB") -> None:
    from vlcluster.sizes import PRESETS

    stage = run_dir / name
    stage.mkdir(parents=True)
    (stage / "model.json").write_text(json.dumps({**PRESETS["base"], "arch": "agnostic", "image_size": image_size}))
    (stage / "result.json").write_text(json.dumps({"throughput": {"mfu": mfu, "device": device, "precision": "fp16"}}))


def test_a_measured_mfu_of_the_same_shape_and_gpu_replaces_the_default(write_job, tmp_path):
    graph = build_graph(load_pipeline(write_job(JOB)))
    runs = tmp_path / "runs"
    default = estimate(graph, runs / "est")
    assert default["seed"].mfu.source == "default" and default["cpu"].hours is None  # no GPU: not estimated
    write_measured_stage(runs / "older", "seed", 224, 0.5)  # a sibling run directory
    write_measured_stage(runs / "other", "seed", 384, 0.9)  # another shape: not used
    write_measured_stage(runs / "a100", "seed", 224, 0.8, device="NVIDIA A100-SXM4-80GB")  # another GPU: not used
    measured = estimate(graph, runs / "est")
    assert measured["seed"].mfu.value == 0.5 and "older/seed/result.json" in measured["seed"].mfu.source
    assert measured["seed"].hours == pytest.approx(default["seed"].hours * DEFAULT_MFU / 0.5)
    assert measured["ft"].mfu.source == "default"  # 480 px: no run of that shape
    assert estimate(graph, runs / "est", 0.15)["ft"].hours == pytest.approx(default["ft"].hours * 2)
    with pytest.raises(SpecError, match="--mfu must be in"):
        estimate(graph, runs / "est", 1.5)


def test_plan_prints_the_estimates_and_says_the_mfu_is_a_default(write_job):
    result = subprocess.run([sys.executable, "-m", "vlcluster.cli", "plan", str(write_job(JOB))],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "total: " in result.stdout and "GPU-hours on Tesla V100-SXM2-32GB over 2 training stage(s)" in result.stdout
    assert "MFU default" in result.stdout and "critical path, unlimited GPUs:" in result.stdout



def test_a_task_fine_tune_counts_the_route_its_registry_line_names(write_job, tmp_path):
    from vlcluster.tasks.registry import TASKS

    stages = "".join(f"""
  ft_{task}:
    kind: finetune
    task: {task}
    init: {{from: seed}}
    data: {{train: "shards/{{0..3}}.tar"}}
    train: {{steps: 100, batch_size: 64, precision: fp16, device: cuda}}
    resources: {{gpus_per_node: 8, profile: v100}}
""" for task in TASKS)
    graph = build_graph(load_pipeline(write_job(JOB.split("  ft:")[0] + stages)))
    found = estimate(graph, tmp_path / "runs" / "est")
    routes = {task: re.search(r"GFLOP/sample \((.+?)\)", found[f"ft_{task}"].note).group(1) for task in TASKS}
    assert routes == {"vqa": "VQA route", "retrieval": "ITC+ITM", "nlvr2": "2 x VQA route",
                     "classification": "image encoder", "segmentation": "image encoder"}
    assert found["ft_nlvr2"].flops == pytest.approx(2 * found["ft_vqa"].flops)  # a pair of images per sample
    assert found["ft_classification"].flops == found["ft_segmentation"].flops < found["ft_vqa"].flops


def test_critical_path_follows_dependencies_and_family_throttles():
    jobs = [Job("a", "a", 8, 2.0, ()), Job("b", "b", 8, 3.0, ("a",)), Job("c", "c", 8, 1.0, ())]
    assert critical_path(jobs) == (5.0, ["a", "b"])
    sweep = [Job(f"s[{i}]", "s", 8, 1.0, (), max_concurrent=2) for i in range(5)]
    assert critical_path(sweep)[0] == 3.0  # 5 tasks of 1 h, 2 at a time
    assert critical_path([Job(f"s[{i}]", "s", 8, 1.0, ()) for i in range(5)])[0] == 1.0


def replay(jobs: list[Job], cap: int, actual: dict[str, float]) -> int:
    """Run the families as SLURM would once queued: a family starts when every
    family it depends on or waits for has ended, its tasks `parallel` at a
    time; returns the most GPUs ever held at once."""
    shaped = shape_for_cap(jobs, cap)
    fams = {fam.name: fam for fam in families(jobs)}
    family_of = {job.name: job.family for job in jobs}
    end: dict[str, float] = {}
    intervals = []
    for name, fam in fams.items():
        before = {family_of[dep] for job in fam.jobs for dep in job.deps} | set(shaped.waits_for[name])
        begin = max((end[b] for b in before - {name}), default=0.0)
        lanes = [begin] * shaped.parallel[name]
        for job in fam.jobs:
            lanes.sort()
            intervals.append((lanes[0], lanes[0] + actual[job.name], job.gpus))
            lanes[0] += actual[job.name]
        end[name] = max(lanes)
    points = sorted({start for start, _, _ in intervals})
    return max(sum(gpus for start, stop, gpus in intervals if start <= t < stop) for t in points)


def test_the_cap_holds_whatever_the_real_durations_are():
    jobs = [
        *(Job(f"seed[{i}]", "seed", 48, float(i), ()) for i in range(4)),
        Job("maa", "maa", 48, 8.0, ()),
        *(Job(f"vlpt[{i}]", "vlpt", 48, 4.0 - i, (f"seed[{i}]",)) for i in range(4)),
        *(Job(f"ft[{i}]", "ft", 8, 1.0, (f"vlpt[{i}]",)) for i in range(4)),
        Job("evals", "evals", 1, 0.5, ("maa",)),
        Job("report", "report", 0, 0.1, tuple(f"ft[{i}]" for i in range(4))),
    ]
    shaped = shape_for_cap(jobs, 96)
    assert shaped.parallel["seed"] == 2 and shaped.parallel["ft"] == 4
    rng = random.Random(0)
    for _ in range(200):  # the estimates only choose slots; any real durations keep the bound
        actual = {job.name: rng.uniform(0.01, 10.0) for job in jobs}
        assert replay(jobs, 96, actual) <= 96
    assert replay(jobs, 96, {job.name: job.hours + 0.01 for job in jobs}) == 96  # and the cap is used
    with pytest.raises(CapError, match="stage seed\\[0\\] asks for 48 GPUs; limits.gpus is 32"):
        shape_for_cap(jobs, 32)


def test_paper_recipe_under_its_cap_never_asks_for_more_than_96_gpus():
    from vlcluster.estimate import jobs_of

    graph = build_graph(load_pipeline(REPO / "jobs/paper_recipe.yaml"))
    assert graph.pipeline.limits.gpus == 96
    jobs = jobs_of(graph, estimate(graph, REPO / "runs" / "paper_recipe"))
    rng = random.Random(1)
    for _ in range(20):
        assert replay(jobs, 96, {job.name: rng.uniform(0.1, 50.0) for job in jobs}) <= 96
    assert replay(jobs, 96, {job.name: job.hours + 0.01 for job in jobs}) == 96


def test_a_cap_below_one_stage_is_a_spec_error_in_plan(write_job, tmp_path):
    graph = build_graph(load_pipeline(write_job(JOB), ["limits.gpus=8"]))
    with pytest.raises(SpecError, match="stage seed asks for 16 GPUs; limits.gpus is 8"):
        summary(graph, estimate(graph, tmp_path / "run"), "job.yaml")


def test_ray_starts_a_ready_stage_only_within_the_cap_and_its_family_throttle(write_job):
    from vlcluster.backends.ray.backend import admitted

    graph = build_graph(load_pipeline(write_job("""
name: ray-cap
limits: {gpus: 24}
stages:
  seed:
    kind: pretrain
    data: {train: "shards/{0..3}.tar"}
    train: {steps: 1}
    sweep: {train.steps: [1, 2, 3]}
    resources: {gpus_per_node: 8, max_concurrent: 2}
  ft: {kind: pretrain, data: {train: "shards/{0..3}.tar"}, train: {steps: 1}, resources: {gpus_per_node: 8}}
  cpu: {kind: pretrain, data: {train: "shards/{0..3}.tar"}, train: {steps: 1}}
""")))
    seeds = [name for name in graph.order if name.startswith("seed[")]
    assert admitted(graph, seeds[0], []) and admitted(graph, seeds[1], seeds[:1])
    assert not admitted(graph, seeds[2], seeds[:2])  # max_concurrent 2 of the sweep
    assert admitted(graph, "ft", seeds[:2])  # 16 + 8 = 24 GPUs: fits
    assert not admitted(graph, "ft", [*seeds[:2], "ft"])  # 32 > 24
    assert admitted(graph, "cpu", [*seeds[:2], "ft"])  # no GPUs: never held back by the cap
