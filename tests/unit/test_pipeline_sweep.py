"""The top-level ``sweep`` (jobspec/sweep.py): fields of several
stages varied together (``zip``) or alone (``product``), the stages they
reach copied per element and the rest shared; the report gathering one row
per element; SLURM arrays waiting task by task; jobs/paper_recipe.yaml
planned, dry-run on SLURM and rendered for Kubernetes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.support import REPO
from tests.support.cli import cli
from vlcluster.graph import build_graph
from vlcluster.errors import SpecError
from vlcluster.jobspec.load import load_pipeline

# K_seed + K_VL = 10 as one zip, the merge's alpha as its own axis.
ZIPPED = """
name: zipped
sweep:
  zip:
    stages.seed.train.steps: [0, 5, 10]
    stages.vlpt.train.steps: [10, 5, 0]
  product:
    stages.merge.alpha: [0.25, 0.75]
stages:
  data: {kind: data}
  seed: {kind: pretrain, model: {arch: agnostic}, data: {from: data}, train: {steps: 5}}
  vlpt: {kind: pretrain, model: {arch: specific}, init: {from: seed}, data: {from: data}, train: {steps: 5}}
  metrics: {kind: metrics, source: vlpt}
  merge: {kind: merge, source: vlpt, alpha: 0.5}
  ev_merged: {kind: eval, source: merge, data: {from: data}}
  ev_msa: {kind: eval, source: vlpt, data: {from: data}}
  maa: {kind: pretrain, model: {arch: agnostic}, data: {from: data}, train: {steps: 10}}
  ev_maa: {kind: eval, source: maa, data: {from: data}}
  table:
    kind: report
    rows: {MAA: ev_maa, MSA: ev_msa, merged: ev_merged}
    mergeability: {K: {metrics: metrics, merged: ev_merged, unmerged: ev_msa}}
"""

SEED = ["seed[seed.train.steps=0]", "seed[seed.train.steps=5]", "seed[seed.train.steps=10]"]
VLPT = ["vlpt[seed.train.steps=0,vlpt.train.steps=10]", "vlpt[seed.train.steps=5,vlpt.train.steps=5]",
        "vlpt[seed.train.steps=10,vlpt.train.steps=0]"]


def graph_of(write_job, text=ZIPPED, overrides=()):
    path = write_job(text)
    return build_graph(load_pipeline(path, list(overrides)), str(path))


def spec_error(write_job, text) -> str:
    with pytest.raises(SpecError) as info:
        graph_of(write_job, text)
    return str(info.value)


def test_zip_copies_the_stages_its_fields_reach_and_shares_the_rest(write_job):
    graph = graph_of(write_job)
    stages = graph.pipeline.stages
    assert [stages[name].train.steps for name in SEED] == [0, 5, 10]
    assert [stages[name].train.steps for name in VLPT] == [10, 5, 0]
    for seed, vlpt in zip(SEED, VLPT):  # each VL stage starts from the seed of its own element
        assert stages[vlpt].init.from_ == seed
        assert graph.deps[vlpt] == (seed, "data")
        assert graph.deps[vlpt.replace("vlpt[", "metrics[", 1)] == (vlpt,)
        assert graph.deps[vlpt.replace("vlpt[", "ev_msa[", 1)] == ("data", vlpt)
        for alpha in (0.25, 0.75):  # the product axis multiplies only what it reaches
            merge = vlpt.replace("vlpt[", "merge[", 1)[:-1] + f",merge.alpha={alpha}]"
            assert stages[merge].alpha == alpha and graph.deps[merge] == (vlpt,)
            assert graph.deps[merge.replace("merge[", "ev_merged[", 1)] == ("data", merge)
    # No swept field reaches data, maa or ev_maa: one stage each, shared by every element.
    for shared in ("data", "maa", "ev_maa"):
        assert shared in stages
    assert sum(1 for name in stages if name.startswith(("seed", "vlpt", "metrics", "ev_msa"))) == 12
    assert sum(1 for name in stages if name.startswith(("merge[", "ev_merged["))) == 12
    assert len(graph.order) == 3 + 12 + 12 + 1  # data, maa, ev_maa; copies; the report
    assert stages[SEED[0]].sweep is None and graph.pipeline.sweep is None


def test_report_gathers_one_row_and_one_mergeability_point_per_element(write_job):
    graph = graph_of(write_job)
    table = graph.pipeline.stages["table"]
    assert table.rows["MAA"] == "ev_maa"
    assert table.rows["MSA [seed.train.steps=5,vlpt.train.steps=5]"] == "ev_msa[seed.train.steps=5,vlpt.train.steps=5]"
    assert table.rows["merged [seed.train.steps=0,vlpt.train.steps=10,merge.alpha=0.75]"] == \
        "ev_merged[seed.train.steps=0,vlpt.train.steps=10,merge.alpha=0.75]"
    assert len(table.rows) == 1 + 3 + 6
    point = table.mergeability["K [seed.train.steps=10,vlpt.train.steps=0,merge.alpha=0.25]"]
    assert (point.metrics, point.unmerged) == ("metrics[seed.train.steps=10,vlpt.train.steps=0]", "ev_msa[seed.train.steps=10,vlpt.train.steps=0]")
    assert point.merged == "ev_merged[seed.train.steps=10,vlpt.train.steps=0,merge.alpha=0.25]"
    assert len(table.mergeability) == 6
    assert len(graph.deps["table"]) == 1 + 3 + 6 + 3  # every row's eval and every metrics copy


def test_a_copy_hashes_like_the_same_stage_without_a_sweep(write_job):
    """Copies are ordinary stages: a copy whose values and inputs are the
    unswept ones has the same hash; shared stages keep theirs (a copy reading
    other copies differs: its references name them)."""
    swept = graph_of(write_job)
    plain = graph_of(write_job, ZIPPED.split("stages:\n", 1)[0].split("sweep:")[0] + "stages:\n" + ZIPPED.split("stages:\n", 1)[1])
    assert plain.pipeline.sweep is None and "seed" in plain.pipeline.stages
    for name in ("data", "maa", "ev_maa"):
        assert swept.hashes[name] == plain.hashes[name]
    assert swept.hashes["seed[seed.train.steps=5]"] == plain.hashes["seed"]
    assert len({swept.hashes[name] for name in SEED + VLPT}) == 6
    assert graph_of(write_job).hashes == swept.hashes  # the expansion is deterministic


def test_sweep_survives_the_run_directory_round_trip(write_job, tmp_path):
    from vlcluster.stages.context import load_graph, save_pipeline

    graph = graph_of(write_job)
    save_pipeline(tmp_path, graph)
    again = load_graph(tmp_path)
    assert again.order == graph.order and again.hashes == graph.hashes


def test_k_seed_of_each_zipped_element_is_read_from_its_copies(write_job, tmp_path):
    """The study report keys Table 1, Figure 3 and Table 5 by K_seed: read
    from the copy each eval descends from, 0 for the merging baseline."""
    from vlcluster.stages.context import save_pipeline
    from vlcluster.stages.rundir import stage_dir, write_json_atomic
    from vlcluster.study.lineage import collect_arms

    graph = graph_of(write_job)
    save_pipeline(tmp_path, graph)
    for name in graph.order:
        if graph.pipeline.stages[name].kind == "eval":
            stage_dir(tmp_path, name).root.mkdir(parents=True)
            write_json_atomic(stage_dir(tmp_path, name).result_file, {"tr": 50.0, "ir": 40.0})
    arms = {arm.eval_stage: arm for arm in collect_arms([tmp_path])}
    for k_seed, k_vl in ((0, 10), (5, 5), (10, 0)):
        element = f"seed.train.steps={k_seed},vlpt.train.steps={k_vl}"
        msa = arms[f"ev_msa[{element}]"]
        assert (msa.role, msa.arch, msa.k_seed, msa.k_vl) == ("MSA", "specific", k_seed, k_vl)
        merged = arms[f"ev_merged[{element},merge.alpha=0.25]"]
        assert (merged.k_seed, merged.k_vl, merged.merge.knob) == (k_seed, k_vl, ("alpha", 0.25))
        assert merged.role == ("merging baseline" if k_seed == 0 else "merged")
    assert (arms["ev_maa"].role, arms["ev_maa"].k_seed) == ("MAA", 10)


def test_a_stage_sweep_downstream_of_a_pipeline_sweep_keeps_one_bracket(write_job):
    text = ZIPPED.replace("  product:\n    stages.merge.alpha: [0.25, 0.75]\n", "") \
                 .replace("merge: {kind: merge, source: vlpt, alpha: 0.5}", "merge: {kind: merge, source: vlpt, sweep: {alpha: [0.25, 0.75]}}") \
                 .replace("ev_maa: {kind: eval, source: maa, data: {from: data}}", "ev_maa: {kind: eval, source: maa, data: {from: data}, after: [merge]}") \
                 .replace("  table:", "  later: {kind: eval, source: vlpt, data: {from: data}, after: [merge]}\n  table:") \
                 .replace("merged: ev_merged}", "merged: ev_msa}").replace("merged: ev_merged,", "merged: ev_msa,") \
                 .replace("  ev_merged: {kind: eval, source: merge, data: {from: data}}\n", "")
    graph = graph_of(write_job, text)
    merges = [name for name in graph.order if name.startswith("merge[")]
    assert merges[:2] == ["merge[seed.train.steps=0,vlpt.train.steps=10,alpha=0.25]", "merge[seed.train.steps=0,vlpt.train.steps=10,alpha=0.75]"]
    assert len(merges) == 6
    assert set(graph.deps["ev_maa"]) == {"data", "maa", *merges}  # a shared stage waits for every copy
    later = "later[seed.train.steps=5,vlpt.train.steps=5]"  # a copy waits for the copies of its own element
    assert set(graph.deps[later]) == {"data", VLPT[1], *(m for m in merges if "seed.train.steps=5," in m)}


def test_after_between_zipped_stages_pairs_the_same_element(write_job):
    text = """
name: paired
sweep: {zip: {stages.a.seed: [0, 1, 2], stages.b.seed: [5, 6, 7]}}
stages:
  a: {kind: data}
  b: {kind: data, after: [a]}
  c: {kind: data, after: [a]}
"""
    graph = graph_of(write_job, text)
    assert graph.deps["b[b.seed=6]"] == ("a[a.seed=1]",)  # the same zip element, not every copy of a
    assert graph.deps["c"] == ("a[a.seed=0]", "a[a.seed=1]", "a[a.seed=2]")  # shared: after all of them


def test_a_copy_can_be_named_to_build_on_one_element(write_job):
    text = ZIPPED + '  attn: {kind: pretrain, model: {arch: custom_attn}, init: {from: "seed[seed.train.steps=5]"}, data: {from: data}, train: {steps: 5}}\n'
    graph = graph_of(write_job, text)
    assert graph.deps["attn"] == ("seed[seed.train.steps=5]", "data")


@pytest.mark.parametrize("sweep, expected", [
    ("{zip: {stages.seed.train.steps: [0, 5, 10], stages.vlpt.train.steps: [10, 5]}}",
     "sweep: Value error, zip.stages.vlpt.train.steps: 2 values, but zip.stages.seed.train.steps has 3; zipped fields vary together"),
    ("{zip: {stages.sede.train.steps: [0, 5]}}", "sweep.zip.stages.sede.train.steps: no stage 'sede' (stages: data, seed, vlpt, "),
    ("{zip: {stages.sede.train.steps: [0, 5]}}", "; did you mean 'seed'?"),
    ("{product: {stages.seed.train.stepz: [0, 5]}}", "sweep.product.stages.seed.train.stepz[0]: 0 gives stages.seed.train.stepz: unknown field; did you mean 'steps'?"),
    ("{zip: {stages.seed.train.steps: [5, -1]}}", "sweep.zip.stages.seed.train.steps[1]: -1 gives stages.seed.train.steps: Input should be greater than or equal to 0"),
    ("{product: {stages.seed.resources.nodes: [1, 2]}}", "sweep.product.stages.seed.resources.nodes: resources vary only in a zip"),
    ("{zip: {stages.seed.resources.nodes: [1, 2]}}", "sweep.zip.stages.seed.resources.nodes: no zipped field that changes what the stage computes"),
    ("{zip: {stages.seed.train.steps: [0, 5], stages.seed.resources.nodes: [1, 0]}}",
     "sweep.zip.stages.seed.resources.nodes[1]: 0 gives stages.seed.resources.nodes: Input should be greater than or equal to 1"),
    ("{zip: {stages.seed.train.steps: [0, 5], stages.seed.after: [[], [data]]}}", "'after' cannot be swept"),
    ("{product: {stages.vlpt.init.from: [data, maa]}}", "sweep.product.stages.vlpt.init.from: a reference to another stage cannot be swept"),
    ("{product: {stages.seed.model.size: [tiny, 2024-01-01]}}",  # YAML reads a date: one clear error, no traceback
     "sweep.product.stages.seed.model.size[1]: \"2024-01-01\" gives stages.seed.model.size: Input should be"),
    ("{product: {stages.table.title: [a, b]}}", "sweep.product.stages.table.title: a report stage gathers the copies of others"),
    ("{product: {seed.train.steps: [1]}}", "product.seed.train.steps: expected stages.STAGE.FIELD"),
    ("{zip: {stages.seed.train.steps: []}}", "zip.stages.seed.train.steps: no values"),
    ("{}", "give 'zip' (fields that vary together) and/or 'product'"),
])
def test_sweep_errors_name_the_field(write_job, sweep, expected):
    text = re.sub(r"sweep:\n  zip:\n.*?\n  product:\n.*?\n(?=stages:)", f"sweep: {sweep}\n", ZIPPED, flags=re.DOTALL)
    message = spec_error(write_job, text)
    assert message.startswith(f"{write_job(text)}:") and expected in message, message


def test_a_gathered_label_may_not_repeat_one_written(write_job):
    text = ZIPPED.replace("rows: {MAA: ev_maa,", "rows: {MAA: ev_maa, 'MSA [seed.train.steps=5,vlpt.train.steps=5]': ev_maa,")
    assert "rows: the sweep makes the label 'MSA [seed.train.steps=5,vlpt.train.steps=5]', which is also written" in spec_error(write_job, text)


def test_a_stage_sweep_and_the_pipeline_sweep_cannot_both_vary_one_field(write_job):
    text = ZIPPED.replace("merge: {kind: merge, source: vlpt, alpha: 0.5}", "merge: {kind: merge, source: vlpt, sweep: {alpha: [0.1]}}")
    assert "stages.merge.sweep varies 'alpha' too" in spec_error(write_job, text)


def test_the_stage_cap_counts_every_copy(write_job):
    text = ZIPPED.replace("stages.merge.alpha: [0.25, 0.75]", "stages.merge.alpha: [" + ", ".join(f"{i / 400}" for i in range(400)) + "]")
    message = spec_error(write_job, text)
    assert "the sweeps expand to 2416 stages (at most 1000): seed x3, vlpt x3, metrics x3, merge x1200, ev_merged x1200, ev_msa x3" in message



def test_the_cap_counts_exactly_the_stages_a_stage_sweep_inside_a_pipeline_sweep_builds(write_job):
    from vlcluster.jobspec.sweep import Expansion, stage_counts

    batches = "  ev_batch: {kind: eval, source: vlpt, data: {from: data}, sweep: {batch_size: [8, 16]}}\n"
    text = ZIPPED.replace("  maa:", batches + "  maa:")
    pipeline = load_pipeline(write_job(text))
    counts = stage_counts(pipeline, Expansion(pipeline, "zipped.yaml"))
    built = graph_of(write_job, text).order
    assert counts["ev_batch"] == 6 == sum(name.startswith("ev_batch[") for name in built)
    assert sum(counts.values()) == len(built)

# ---- SLURM: job arrays waiting task by task ----------------------------------------


def units_and_dependencies(graph, done: set[str] = frozenset()) -> dict[str, tuple[int, str | None]]:
    """What the slurm backend's dry run would queue: unit -> (tasks, --dependency)."""
    from vlcluster.backends.slurm.backend import SlurmBackend, submission_units
    from vlcluster.plan import StagePlan

    plans = [StagePlan(name, graph.pipeline.stages[name].kind, graph.deps[name], graph.hashes[name],
                       "done" if name in done else "new", None, 1, 1) for name in graph.order]
    submitted: dict[str, str] = {}
    queued = {}
    for number, unit in enumerate(submission_units(graph, plans), start=100):
        whole, corresponding = SlurmBackend.upstream_jobs(graph, unit, submitted)
        flags = [f"afterok:{':'.join(dict.fromkeys(whole))}"] * bool(whole) + [f"aftercorr:{':'.join(corresponding)}"] * bool(corresponding)
        queued[unit.key] = (len(unit.plans), ",".join(flags) or None)
        for index, plan in enumerate(unit.plans):
            submitted[plan.name] = f"{number}_{index}" if unit.is_array else str(number)
    return queued


def test_each_copy_waits_for_its_own_element_upstream(write_job):
    queued = units_and_dependencies(graph_of(write_job))
    assert queued["data"] == (1, None)
    assert queued["seed"] == (3, "afterok:100")
    assert queued["vlpt"] == (3, "afterok:100,aftercorr:101")  # element i after seed's task i
    assert queued["metrics"] == (3, "aftercorr:102")
    assert queued["merge"] == (6, "afterok:102")  # two merges per VL model: the whole array
    assert queued["ev_merged"] == (6, "afterok:100,aftercorr:104")


def test_an_element_already_done_leaves_the_array_waiting_on_tasks_not_on_positions(write_job):
    """With the first VL copy done, the eval array's task 0 reads no task of
    it and task 1 reads task 0: aftercorr would pair them wrongly, so the
    array waits for the tasks it reads (here all of them: the array id)."""
    graph = graph_of(write_job)
    queued = units_and_dependencies(graph, done={VLPT[0], SEED[0]})
    assert queued["vlpt"] == (2, "afterok:100,aftercorr:101")  # tasks 0, 1 are elements 1, 2 of both
    assert queued["ev_msa"] == (3, "afterok:100:102")
    queued = units_and_dependencies(graph, done={VLPT[0], SEED[0], "ev_msa[seed.train.steps=5,vlpt.train.steps=5]"})
    assert queued["ev_msa"] == (2, "afterok:100:102_1")  # element 2 only: task 1 of the vlpt array


# ---- jobs/paper_recipe.yaml -----------------------------------------------------------


PAPER = "jobs/paper_recipe.yaml"
WIDE = {"COLUMNS": "300"}  # the CLI's output at a width that wraps no line
K_SEEDS = ((0, 200000), (50000, 150000), (100000, 100000), (150000, 50000))


@pytest.fixture(scope="module")
def paper_graph():
    return build_graph(load_pipeline(REPO / PAPER), PAPER)


def test_paper_recipe_plans_the_whole_study(paper_graph):
    graph = paper_graph
    stages = graph.pipeline.stages
    for k_seed, k_vl in K_SEEDS:
        seed, vlpt = stages[f"seed[seed.train.steps={k_seed}]"], stages[f"vlpt[seed.train.steps={k_seed},vlpt.train.steps={k_vl}]"]
        assert (seed.train.steps + vlpt.train.steps, seed.train.batch_size, seed.model.image_size) == (200000, 1024, 224)
        assert (seed.model.size, seed.model.arch, vlpt.model.arch, seed.resources.profile) == ("base", "agnostic", "specific", "v100")
    assert stages["seed[seed.train.steps=0]"].init.format == "beit"
    assert {stages[name].model.arch for name in ("maa", "attn", "ffn", "ln")} == {"agnostic", "custom_attn", "custom_ffn", "custom_ln"}
    knobs = {(s.method, s.alpha if s.method == "interpolation" else s.lam if s.method == "arithmetic" else s.gamma)
             for s in stages.values() if s.kind == "merge" and "100000" in s.source and not s.source.startswith(("attn", "ffn", "ln"))}
    assert knobs == {("interpolation", a) for a in (0.0, 0.25, 0.5, 0.75, 1.0)} | {("arithmetic", x) for x in (0.25, 0.5, 0.75, 1.0)} \
        | {("regmean", g) for g in (0.0, 0.25, 0.5, 0.75, 1.0)}
    tasks = {(s.task, s.data.from_) for s in stages.values() if s.kind == "finetune"}
    assert tasks == {("vqa", "vqa_data"), ("retrieval", "coco_data"), ("retrieval", "f30k_data"), ("nlvr2", "nlvr2_data"),
                     ("classification", "imagenet_data"), ("segmentation", "ade20k_data")}
    vqa = stages["ft_merged_vqa[seed.train.steps=100000,vlpt.train.steps=100000]"]  # Table 6
    assert (vqa.model.image_size, vqa.train.lr, vqa.train.batch_size) == (480, 3e-5, 128)
    assert (stages["ft_msa_coco[seed.train.steps=0,vlpt.train.steps=200000]"].train.batch_size, stages["ft_maa_f30k"].train.lr) == (640, 6.25e-7)
    assert sorted(stages["paper"].mergeability) == sorted(f"K_seed [seed.train.steps={k},vlpt.train.steps={v}]" for k, v in K_SEEDS)
    assert len(graph.order) == 188

    result = cli("plan", PAPER, env=WIDE)
    assert result.returncode == 0, result.stderr
    for k_seed, k_vl in K_SEEDS:
        assert f"vlpt[seed.train.steps={k_seed},vlpt.train.steps={k_vl}]: 6 node(s) x 8 rank(s); 8 GPU/node; time 2880 min; {k_vl} steps, batch 1024" in result.stdout


def sbatch_units(script: str) -> dict[str, dict]:
    """unit -> {tasks, dependency, nodes} from the dry run's scripts."""
    units = {}
    for block in script.split("# ---- ")[1:]:
        head = block.splitlines()[0]
        name, size = re.match(r"(\S+): (?:job array of (\d+)|one job)", head).groups()
        dependency = re.search(r"#SBATCH --dependency='?([^'\n]+)'?", block)
        array = re.search(r"#SBATCH --array=(\S+)", block)
        units[name] = {"tasks": int(size or 1), "array": array.group(1) if array else None,
                       "dependency": dependency.group(1) if dependency else None,
                       "nodes": int(re.search(r"#SBATCH --nodes=(\d+)", block).group(1))}
    return units


def test_paper_recipe_dry_runs_on_slurm_as_arrays_chained_task_by_task():
    """Without its GPU cap (below, with): the K_seed = 0 copy asks for one GPU,
    so it is a job of its own, and so is every copy reading it: each array
    still waits for its own element upstream."""
    result = cli("submit", PAPER, "--backend", "slurm", "--dry-run", "--run-dir", "/scratch/vl/runs/paper_recipe", "--set", "limits={}", env=WIDE)
    assert result.returncode == 0, result.stderr
    units = sbatch_units(result.stdout[result.stdout.index("# ---- "):])
    assert sum(unit["tasks"] for unit in units.values()) == 188
    assert units["seed"] == {"tasks": 1, "array": "0-0%1", "dependency": None, "nodes": 1}
    assert units["seed~2"] == {"tasks": 3, "array": "0-2%3", "dependency": None, "nodes": 6}
    assert units["vlpt"] == {"tasks": 1, "array": "0-0%1", "dependency": "aftercorr:<job:seed>", "nodes": 6}
    assert units["vlpt~2"] == {"tasks": 3, "array": "0-2%3", "dependency": "aftercorr:<job:seed~2>", "nodes": 6}
    assert units["maa"]["tasks"] == 1 and units["maa"]["dependency"] is None
    for arch in ("attn", "ffn", "ln"):  # at K_seed = 100k: task 1 of the seed array of 48-GPU copies only
        assert units[arch]["dependency"] == "afterok:<job:seed~2>_1"
    assert units["metrics"]["dependency"] == units["merge"]["dependency"] == "aftercorr:<job:vlpt>"
    assert units["metrics~2"]["dependency"] == units["merge~2"]["dependency"] == "aftercorr:<job:vlpt~2>"
    assert (units["interp"]["tasks"], units["arith"]["tasks"], units["regmean"]["tasks"]) == (4, 4, 5)
    assert units["interp"]["dependency"] == "afterok:<job:vlpt~2>_1"
    assert units["arith"]["dependency"] == "afterok:<job:vlpt~2>_1:<job:seed~2>_1"
    assert units["regmean"]["dependency"] == "afterok:<job:grams>:<job:vlpt~2>_1"
    assert units["ft_merged_vqa~2"] == {"tasks": 3, "array": "0-2%3", "dependency": "afterok:<job:vqa_data>,aftercorr:<job:merge~2>", "nodes": 1}
    assert units["ft_msa_coco~2"]["dependency"] == "afterok:<job:coco_data>,aftercorr:<job:vlpt~2>"
    assert units["ft_msa_coco"]["nodes"] == 4
    assert units["eval_regmean_coco"]["dependency"] == "afterok:<job:coco_data>,aftercorr:<job:ft_regmean_coco>"
    report = units["paper"]["dependency"]
    for array in ("eval_msa_vqa", "eval_merged_coco", "eval_interp_vqa", "metrics"):
        assert f"<job:{array}>" in report  # the report waits for every element
    assert "#SBATCH --gpus-per-node=v100:8" in result.stdout and "#SBATCH --partition=gpu" in result.stdout


def test_paper_recipe_asks_for_at_most_96_gpus_at_once_on_slurm():
    """limits.gpus: 96 in the file: two 48-GPU pre-trainings at a time, each job
    after the jobs whose GPUs it takes (afterany), the 1-GPU K_seed = 0 copy first."""
    result = cli("submit", PAPER, "--backend", "slurm", "--dry-run", "--run-dir", "/scratch/vl/runs/paper_recipe", env=WIDE)
    assert result.returncode == 0, result.stderr
    units = sbatch_units(result.stdout[result.stdout.index("# ---- "):])
    assert "# limits.gpus 96: each job also waits (afterany)" in result.stdout
    assert units["seed"]["array"] == "0-0%1" and "#SBATCH --gpus-per-node=v100:1" in result.stdout
    assert units["seed~2"] == {"tasks": 3, "array": "0-2%2", "dependency": "afterany:<job:seed>", "nodes": 6}
    assert units["vlpt~2"]["array"] == "0-2%2" and units["vlpt~2"]["dependency"].startswith("aftercorr:<job:seed~2>,afterany:")
    assert "afterany" in units["maa"]["dependency"]
    for name, unit in units.items():  # 6 x 8 GPUs a task: at most two at once; 4 x 8: at most three
        if unit["array"] and unit["nodes"] > 1:
            assert int(unit["array"].split("%")[1]) <= 96 // (unit["nodes"] * 8), name


def test_zipped_resources_set_each_copy_without_renaming_it(write_job):
    text = ZIPPED.replace("    stages.vlpt.train.steps: [10, 5, 0]\n", "    stages.vlpt.train.steps: [10, 5, 0]\n    stages.seed.resources: [{nodes: 1}, {nodes: 2}, {nodes: 2}]\n")
    graph = graph_of(write_job, text)
    assert [graph.pipeline.stages[name].resources.nodes for name in SEED] == [1, 2, 2]
    assert [graph.pipeline.stages[name].resources.nodes for name in VLPT] == [1, 1, 1]  # resources reach nothing downstream
    assert graph.hashes == graph_of(write_job, ZIPPED).hashes  # nor any stage's identity
    queued = units_and_dependencies(graph)
    assert (queued["seed"], queued["seed~2"]) == ((1, "afterok:100"), (2, "afterok:100"))
    # every stage reading the copies splits alike, so each array still waits task by task
    assert (queued["vlpt"], queued["vlpt~2"]) == ((1, "afterok:100,aftercorr:101"), (2, "afterok:100,aftercorr:102"))
    assert (queued["merge"], queued["merge~2"]) == ((2, "afterok:103"), (4, "afterok:104"))
    clash = text.replace("stages.vlpt.train.steps: [10, 5, 0]", "stages.vlpt.train.steps: [10, 5, 1]").replace(
        "stages.seed.train.steps: [0, 5, 10]", "stages.seed.train.steps: [0, 0, 10]")
    assert "give it different values" in spec_error(write_job, clash)


def test_paper_recipe_renders_for_kubernetes():
    from vlcluster.backends.k8s.validate import validation_errors

    result = subprocess.run([sys.executable, "-m", "vlcluster.cli", "render", PAPER, "--backend", "k8s"],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}
    assert list(objects) == ["ConfigMap", "RayCluster", "RayJob"]
    assert validation_errors(list(objects.values())) == []
    groups = {group["groupName"]: group["maxReplicas"] for group in objects["RayCluster"]["spec"]["workerGroupSpecs"]}
    assert max(replicas for name, replicas in groups.items() if name.startswith("gpu8-")) == 6  # a pre-training stage
    job = yaml.safe_load(next(iter(objects["ConfigMap"]["data"].values())))
    assert job["sweep"]["zip"]["stages.seed.train.steps"] == [0, 50000, 100000, 150000]  # expanded on the head


# Measured in the replicated run of the small study (docs/results/study.md: 2 cores, one rank per stage
# with both cores as threads): seconds per pre-training step (batch 64) and per fine-tuning step
# (batch 32), start-up included; per eval, per merge / metrics / report stage; the data stage once.
STUDY_RATES = {"pretrain": 0.283, "finetune": 0.086, "eval": 2.0, "merge": 1.5, "metrics": 1.5, "report": 6.0, "data": 12.0}


def test_paper_study_small_is_three_replicates_of_the_core_within_two_hours(paper_graph):
    small = build_graph(load_pipeline(REPO / "jobs/paper_study_small.yaml"), "small").pipeline.stages
    assert len(small) == 158
    for rep in range(3):
        mine = {name: s for name, s in small.items() if name.split("[")[-1].startswith(f"rep={rep}")}
        assert {s.train.seed for s in mine.values() if s.kind in ("pretrain", "finetune")} == {rep}
        k_seeds = sorted(s.train.steps for name, s in mine.items() if name.startswith("seed["))
        assert k_seeds == [0, 150, 300, 450]
        assert sorted(s.alpha for name, s in mine.items() if s.kind == "merge" and "300" in s.source and not s.source.startswith("ft_")) \
            == [0.0, 0.5, 0.75, 1.0]  # Table 2's alpha axis at K_seed = 300
        assert sum(s.kind == "merge" and s.source.startswith("ft_msa") for s in mine.values()) == 4  # the footnote, per K_seed
    assert [name for name in small if "rep=" not in name] == ["data", "study"]
    seconds = sum(STUDY_RATES[s.kind] * (s.train.steps if s.kind in ("pretrain", "finetune") else 1) for s in small.values())
    assert seconds / 60 <= 120, f"{seconds / 60:.1f} minutes estimated"
    # The same kinds of merge as the full recipe's interpolation, of pre-trained and of fine-tuned models.
    assert {(s.method, small[s.source].kind) for s in small.values() if s.kind == "merge"} == {("interpolation", "pretrain"), ("interpolation", "finetune")}


def test_set_on_a_swept_field_is_refused_naming_the_sweep(write_job):
    """The sweep's values would replace a --set value without a word: refuse it instead."""
    for field, where in (("stages.seed.train.steps", "sweep.zip"), ("stages.merge.alpha", "sweep.product")):
        with pytest.raises(SpecError) as info:
            graph_of(write_job, overrides=[f"{field}=7"])
        assert f"--set {field}:" in str(info.value) and f"({where})" in str(info.value)
    own = ZIPPED.replace("  product:\n    stages.merge.alpha: [0.25, 0.75]\n", "").replace(
        "merge: {kind: merge, source: vlpt, alpha: 0.5}", "merge: {kind: merge, source: vlpt, sweep: {alpha: [0.25, 0.75]}}")
    with pytest.raises(SpecError, match=r"stages\.merge\.sweep"):  # a stage's own sweep
        graph_of(write_job, own, ["stages.merge.alpha=0.5"])
    graph = graph_of(write_job, overrides=["stages.maa.train.steps=3"])  # a field no sweep touches
    assert graph.pipeline.stages["maa"].train.steps == 3


# ---- replicates: N --------------------------------------------------------------------

def test_replicates_copy_the_seeded_chain_with_their_own_seeds_and_share_the_data(write_job):
    text = ZIPPED.replace("name: zipped\n", "name: zipped\nreplicates: 2\n").replace(
        "train: {steps: 10}}", "train: {steps: 10, seed: 7}}")  # maa: replicate k trains with seed 7 + k
    stages = graph_of(write_job, text).pipeline.stages
    assert "data" in stages and "table" in stages  # nothing seeded feeds them
    for rep in (0, 1):
        for (k_seed, k_vl), seed, vlpt in zip(((0, 10), (5, 5), (10, 0)), SEED, VLPT):
            seed_copy = seed.replace("[", f"[rep={rep},")
            assert (stages[seed_copy].train.seed, stages[seed_copy].train.steps) == (rep, k_seed)
            vlpt_copy = vlpt.replace("[", f"[rep={rep},")
            assert stages[vlpt_copy].init.from_ == seed_copy and stages[vlpt_copy].train.seed == rep
            assert stages[vlpt_copy.replace("vlpt[", "metrics[")].source == vlpt_copy
        assert stages[f"maa[rep={rep}]"].train.seed == 7 + rep and stages[f"ev_maa[rep={rep}]"].source == f"maa[rep={rep}]"
    assert len(stages) == 2 + 2 * (3 + 3 + 3 + 6 + 6 + 3 + 1 + 1)
    assert sorted(label for label in stages["table"].rows if label.startswith("MAA")) == ["MAA [rep=0]", "MAA [rep=1]"]


def test_a_written_element_reference_follows_its_replicate(write_job):
    text = ZIPPED.replace("name: zipped\n", "name: zipped\nreplicates: 3\n") + (
        '  attn: {kind: pretrain, model: {arch: custom_attn}, init: {from: "seed[seed.train.steps=5]"}, data: {from: data}, train: {steps: 5}}\n'
        '  pinned_merge: {kind: merge, source: "vlpt[seed.train.steps=5,vlpt.train.steps=5]", alpha: 0.5}\n')
    graph = graph_of(write_job, text)
    for rep in range(3):
        assert graph.deps[f"attn[rep={rep}]"] == (f"seed[rep={rep},seed.train.steps=5]", "data")
        assert graph.pipeline.stages[f"pinned_merge[rep={rep}]"].source == f"vlpt[rep={rep},seed.train.steps=5,vlpt.train.steps=5]"


FINETUNED = """
name: finetuned
replicates: {count: 3, of: finetune}
stages:
  data: {kind: data, n_train: 64, n_val: 16, shard_size: 32, tasks: [retrieval], task_n_train: 32, task_n_val: 16}
  msa: {kind: pretrain, model: {arch: specific}, data: {from: data}, train: {steps: 4, batch_size: 8}}
  ft: {kind: finetune, task: retrieval, model: {arch: specific}, init: {from: msa}, data: {from: data}, train: {steps: 2, batch_size: 8}}
  ev: {kind: eval, tasks: [retrieval], source: ft, data: {from: data}}
"""


def test_fine_tune_only_replicates_share_the_pre_training_and_are_labelled_so(write_job, tmp_path):
    from vlcluster.stages.context import save_pipeline
    from vlcluster.study import views
    from vlcluster.study.lineage import collect_arms

    graph = graph_of(write_job, FINETUNED)
    assert sorted(graph.pipeline.stages) == ["data", "ev[rep=0]", "ev[rep=1]", "ev[rep=2]", "ft[rep=0]", "ft[rep=1]", "ft[rep=2]", "msa"]
    assert [graph.pipeline.stages[f"ft[rep={k}]"].train.seed for k in range(3)] == [0, 1, 2]
    save_pipeline(tmp_path, graph)
    for k, score in enumerate((40.0, 44.0, 42.0)):
        (tmp_path / f"ev[rep={k}]").mkdir()
        (tmp_path / f"ev[rep={k}]" / "result.json").write_text(f'{{"tr": {score}, "ir": {score}}}')
    arms = collect_arms([tmp_path])
    assert len(arms) == 3 and len({arm.setting for arm in arms}) == 1
    assert views.replicate_kind(arms) == "fine-tune seeds only"
    assert views.cell(arms, "tr").estimate == pytest.approx(42.0) and views.cell(arms, "tr").n == 3


def test_paper_recipe_with_three_replicates_plans_and_dry_runs_as_arrays():
    graph = build_graph(load_pipeline(REPO / PAPER, ["replicates=3"]), PAPER)
    shared = [name for name in graph.order if "rep=" not in name]
    assert sorted(graph.pipeline.stages[name].kind for name in shared) == ["import"] * 6 + ["report"]
    assert len(graph.order) == 3 * (188 - 7) + 7
    plan = cli("plan", PAPER, "--set", "replicates=3", env=WIDE)
    assert plan.returncode == 0, plan.stderr
    assert sum("│ run " in line for line in plan.stdout.splitlines()) == len(graph.order) == 550
    result = cli("submit", PAPER, "--set", "replicates=3", "--backend", "slurm", "--dry-run", "--run-dir", "/scratch/vl/runs/paper_recipe", env=WIDE)
    assert result.returncode == 0, result.stderr
    units = sbatch_units(result.stdout[result.stdout.index("# ---- "):])
    assert sum(unit["tasks"] for unit in units.values()) == 550
    # 3 replicates x 4 K_seed: the K_seed = 0 copies ask for one GPU (the zipped resources), so they are an
    # array of their own beside the 6-node one; limits.gpus adds throttles and afterany slots
    assert units["seed"] | {"dependency": None} == {"tasks": 3, "array": "0-2%3", "dependency": None, "nodes": 1}
    assert (units["seed~2"]["tasks"], units["seed~2"]["nodes"]) == (9, 6)
    assert units["vlpt"]["dependency"].startswith("aftercorr:<job:seed>")  # replicate k's element i waits for its own seed only
    assert units["vlpt~2"]["dependency"].startswith("aftercorr:<job:seed~2>")
    assert units["maa"]["tasks"] == 3 and units["maa"]["array"].startswith("0-2%")
    # K_seed = 100k of each replicate: element 1 of the three non-zero K_seed of each
    assert units["attn"]["dependency"].startswith("afterok:<job:seed~2>_1:<job:seed~2>_4:<job:seed~2>_7")
    assert units["vqa_data"]["tasks"] == 1 and units["paper"]["tasks"] == 1


@pytest.mark.parametrize("change, expected", [
    (("replicates: 2", "replicates: 2"), None),
    (("stages.merge.alpha: [0.25, 0.75]", "stages.merge.alpha: [0.25, 0.75]\n    stages.maa.train.seed: [1, 2]"),
     "sweep.product.stages.maa.train.seed: replicates set train.seed of this stage"),
    (("train: {steps: 10}}", "train: {steps: 10}, sweep: {train.seed: [1, 2]}}"), "stages.maa.sweep: replicates set train.seed"),
    (("replicates: 2", "replicates: 0"), "replicates.count"),
])
def test_replicates_and_a_seed_sweep_exclude_each_other(write_job, change, expected):
    text = ZIPPED.replace("name: zipped\n", "name: zipped\nreplicates: 2\n").replace(*change)
    if expected is None:
        assert len(graph_of(write_job, text).pipeline.stages) == 54
    else:
        assert expected in spec_error(write_job, text)
