"""Dependency graph: references, cycles, order, spec hashes."""

from __future__ import annotations

import pytest

from vlcluster.graph import build_graph
from vlcluster.errors import SpecError
from vlcluster.jobspec.load import load_pipeline

PIPELINE = """
name: g
stages:
  data: {kind: data}
  seed: {kind: pretrain, data: {from: data}, train: {steps: 5}}
  vlpt: {kind: pretrain, model: {arch: specific}, init: {from: seed}, data: {from: data}, train: {steps: 5}}
  merge: {kind: merge, source: vlpt, alpha: 0.75}
  ev: {kind: eval, source: merge, data: {from: data}}
  table: {kind: report, rows: {merged: ev}}
"""


def graph_of(write_job, text=PIPELINE, overrides=()):
    path = write_job(text)
    return build_graph(load_pipeline(path, list(overrides)), str(path))


def test_dependencies_and_order(write_job):
    graph = graph_of(write_job)
    assert graph.deps["vlpt"] == ("seed", "data")
    assert graph.order == ("data", "seed", "vlpt", "merge", "ev", "table")
    assert graph.upstream("table") == {"data", "seed", "vlpt", "merge", "ev"}


def test_after_adds_an_edge(write_job):
    graph = graph_of(write_job, overrides=["stages.merge.after=[seed]"])
    assert "seed" in graph.deps["merge"]


def test_unknown_reference_names_the_field(write_job):
    with pytest.raises(SpecError) as info:
        graph_of(write_job, overrides=["stages.vlpt.init.from=sed"])
    assert "stages.vlpt.init.from: unknown stage 'sed'" in str(info.value)


def test_reference_to_wrong_kind(write_job):
    with pytest.raises(SpecError, match="stages.merge.source: stage 'data' is a data stage"):
        graph_of(write_job, overrides=["stages.merge.source=data"])


def test_cycle_is_reported_with_its_path(write_job):
    with pytest.raises(SpecError) as info:
        graph_of(write_job, overrides=["stages.seed.after=[merge]"])
    message = str(info.value)
    assert "cycle" in message
    for stage in ("seed", "vlpt", "merge"):
        assert stage in message


def test_self_dependency(write_job):
    with pytest.raises(SpecError, match="cannot depend on itself"):
        graph_of(write_job, overrides=["stages.seed.after=[seed]"])


def test_hash_covers_upstream_but_not_resources(write_job):
    base = graph_of(write_job)
    changed = graph_of(write_job, overrides=["stages.seed.train.lr=0.1"])
    assert changed.hashes["data"] == base.hashes["data"]
    for stage in ("seed", "vlpt", "merge", "ev", "table"):
        assert changed.hashes[stage] != base.hashes[stage]
    resized = graph_of(write_job, overrides=["stages.seed.resources.procs_per_node=4"])
    assert resized.hashes == base.hashes


def test_a_later_field_at_its_default_keeps_existing_hashes(write_job):
    from vlcluster.graph import stage_identity

    base = graph_of(write_job)
    assert "shuffle_run" not in stage_identity(base.pipeline.stages["seed"])["data"]  # hashes as before the field
    assert graph_of(write_job, overrides=["stages.seed.data.shuffle_run=1"]).hashes == base.hashes  # the old default
    assert graph_of(write_job, overrides=["stages.seed.data.shuffle_run=auto"]).hashes == base.hashes
    runs = graph_of(write_job, overrides=["stages.seed.data.shuffle_run=8"])
    assert runs.hashes["seed"] != base.hashes["seed"] and runs.hashes["data"] == base.hashes["data"]


def test_only_the_chosen_merge_methods_parameters_enter_its_hash(write_job):
    ties = ["stages.merge.method=ties", "stages.merge.seed=seed"]
    base = graph_of(write_job, overrides=ties)
    other_alpha = graph_of(write_job, overrides=[*ties, "stages.merge.alpha=0.1"])
    assert other_alpha.hashes["merge"] == base.hashes["merge"]  # ties does not read alpha: no re-run
    other_density = graph_of(write_job, overrides=[*ties, "stages.merge.density=0.2"])
    assert other_density.hashes["merge"] != base.hashes["merge"]
    assert other_density.hashes["ev"] != base.hashes["ev"]
    interpolation = graph_of(write_job)
    assert graph_of(write_job, overrides=["stages.merge.density=0.2"]).hashes == interpolation.hashes
    assert graph_of(write_job, overrides=["stages.merge.alpha=0.2"]).hashes["merge"] != interpolation.hashes["merge"]


@pytest.mark.parametrize(("override", "expected"), [
    ("stages.merge.alpha=5", "stages.merge.alpha"),
    ("stages.merge.alpha=.nan", "stages.merge.alpha"),
    ("stages.merge.density=0", "stages.merge.density"),
    ("stages.merge.lam=0", "stages.merge.lam"),
    ("stages.merge.lam=.inf", "stages.merge.lam"),
    ("stages.merge.part_alpha.ffn=1.5", "stages.merge.part_alpha.ffn"),
])
def test_merge_parameters_out_of_their_declared_range_are_refused(write_job, override, expected):
    with pytest.raises(SpecError, match=expected.replace(".", r"\.")):
        graph_of(write_job, overrides=[override])
