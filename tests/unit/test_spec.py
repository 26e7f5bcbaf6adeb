"""Job-spec loading: strict validation, overrides, messages naming file and field."""

from __future__ import annotations

import json

import pytest

from vlcluster.errors import SpecError
from vlcluster.jobspec.load import json_schema, load_pipeline
from vlcluster.stages.train import FinetuneStage, PretrainStage

MINIMAL = """
name: t
x-train: &train {steps: 10, batch_size: 8}
stages:
  data: {kind: data, n_train: 100, n_val: 10, shard_size: 50}
  seed:
    kind: pretrain
    data: {from: data}
    train: *train
  vlpt:
    kind: pretrain
    model: {arch: specific}
    init: {from: seed}
    data: {from: data}
    train: *train
"""


def test_loads_union_by_kind_and_drops_anchor_keys(write_job):
    pipeline = load_pipeline(write_job(MINIMAL))
    assert isinstance(pipeline.stages["vlpt"], PretrainStage)
    assert pipeline.stages["vlpt"].init.from_ == "seed"
    assert pipeline.stages["vlpt"].model.arch == "specific"
    assert pipeline.resolved_run_dir == "runs/t"


def test_override_changes_one_stage_even_through_an_alias(write_job):
    pipeline = load_pipeline(write_job(MINIMAL), ["stages.vlpt.train.steps=3", "stages.seed.train.lr=0.5"])
    assert pipeline.stages["vlpt"].train.steps == 3
    assert pipeline.stages["seed"].train.steps == 10
    assert pipeline.stages["seed"].train.lr == 0.5


def test_override_creates_nested_mappings(write_job):
    pipeline = load_pipeline(write_job(MINIMAL), ["stages.seed.train.loss_weights.mlm=0.5"])
    assert pipeline.stages["seed"].train.loss_weights.mlm == 0.5
    assert pipeline.stages["seed"].train.loss_weights.itc == 1.0


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stages.seed.train.stpes=3", "stages.seed.train.stpes: unknown key"),
        ("stages.seed.train.steps=many", "stages.seed.train.steps: Input should be a valid integer"),
        ("stages.seed.kind=pretrian", "stages.seed: unknown stage kind 'pretrian'"),
        ("stages.seed.model.arch=wide", "stages.seed.model.arch: Input should be"),
        ("stages.seed.train.steps=-1", "stages.seed.train.steps: Input should be greater than or equal to 0"),
    ],
)
def test_errors_name_file_and_field(write_job, override, expected):
    path = write_job(MINIMAL)
    with pytest.raises(SpecError) as info:
        load_pipeline(path, [override])
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_finetune_requires_init_and_a_task_loss(write_job):
    text = MINIMAL + """
  ft:
    kind: finetune
    data: {from: data}
    train: {steps: 5, loss_weights: {itc: 0, vqa: 0}}
"""
    with pytest.raises(SpecError) as info:
        load_pipeline(write_job(text))
    assert "stages.ft.init: Field required" in str(info.value)
    with pytest.raises(SpecError) as info:  # checked once the fields are valid (it depends on task)
        load_pipeline(write_job(text.replace("kind: finetune", "kind: finetune\n    init: {from: vlpt}")))
    assert "fine-tuning needs a task loss" in str(info.value)


def test_defaults_of_finetune_stage(write_job):
    text = MINIMAL + """
  ft:
    kind: finetune
    init: {from: vlpt}
    data: {from: data}
    train: {steps: 5, loss_weights: {itm: 0, mlm: 0, vqa: 1}}
"""
    stage = load_pipeline(write_job(text)).stages["ft"]
    assert isinstance(stage, FinetuneStage)
    assert stage.train.loss_weights.vqa == 1 and stage.train.loss_weights.itc == 1


def test_an_eval_stage_lists_its_tasks_and_the_single_task_form_says_how_to_write_it(write_job):
    text = MINIMAL + "  ev: {kind: eval, source: vlpt, data: {from: data}, tasks: [nlvr2]}\n"
    assert load_pipeline(write_job(text)).stages["ev"].tasks == ["nlvr2"]
    with pytest.raises(SpecError) as info:
        load_pipeline(write_job(text.replace("tasks: [nlvr2]", "task: nlvr2")))
    message = str(info.value)
    assert "stages.ev" in message and "task: nlvr2 is written tasks: [nlvr2]" in message
    assert "Traceback" not in message and len(message.splitlines()) == 2  # the file line, then one paragraph


def test_bad_yaml_and_non_mapping(write_job):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_pipeline(write_job("name: [unclosed"))
    with pytest.raises(SpecError, match="must be a mapping"):
        load_pipeline(write_job("- a\n- b\n"))
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        load_pipeline(write_job(MINIMAL), ["novalue"])


def test_yaml_is_loaded_safely(write_job):
    with pytest.raises(SpecError, match="not valid YAML"):
        load_pipeline(write_job("name: !!python/object/apply:os.system ['true']\nstages: {}\n"))


def test_schema_is_json_with_the_stage_union():
    schema = json.loads(json_schema())
    kinds = {
        definition["properties"]["kind"]["const"]
        for definition in schema["$defs"].values()
        if "kind" in definition.get("properties", {})
    }
    assert kinds == {"data", "import", "pretrain", "finetune", "grams", "merge", "metrics", "eval", "report"}


def test_batch_must_give_each_rank_two_samples(write_job):
    with pytest.raises(SpecError, match="stages.seed: Value error, train.batch_size 8 gives fewer than 2 samples per rank over 8 ranks"):
        load_pipeline(write_job(MINIMAL), ["stages.seed.resources.procs_per_node=8"])


def test_model_structure_overrides_on_a_preset(write_job):
    overrides = [f"stages.seed.model.{k}={v}" for k, v in
                 {"size": "vit_tiny", "dim": 96, "depth": 3, "heads": 2, "vl_layers": 1, "patch_size": 16, "image_size": 64}.items()]
    model = load_pipeline(write_job(MINIMAL), overrides).stages["seed"].model
    assert model.overrides() == {"dim": 96, "depth": 3, "heads": 2, "vl_layers": 1, "patch_size": 16, "image_size": 64}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dim": 100, "heads": 3}, "stages.seed.model: Value error, model.heads: dim 100 is not divisible by heads 3"),
        ({"size": "vit_tiny", "heads": 5}, "model.heads: dim 192 is not divisible by heads 5"),
        ({"depth": 2, "vl_layers": 3}, "model.vl_layers: must be in [0, depth=2], got 3"),
        ({"patch_size": 12, "image_size": 32}, "model.patch_size: image_size 32 is not a multiple of patch_size 12"),
        ({"size": "huge"}, "stages.seed.model.size: Input should be 'tiny', 'vit_tiny' or 'base'"),
    ],
)
def test_model_structure_errors_name_the_field(write_job, overrides, expected):
    with pytest.raises(SpecError) as info:
        load_pipeline(write_job(MINIMAL), [f"stages.seed.model.{k}={v}" for k, v in overrides.items()])
    assert expected in str(info.value)


def test_patch_size_is_checked_against_the_data_resolution_later(write_job):
    # No explicit image_size: the data stage decides the resolution, so the spec can't judge the patch yet.
    model = load_pipeline(write_job(MINIMAL), ["stages.seed.model.patch_size=12"]).stages["seed"].model
    assert model.patch_size == 12


def test_init_takes_a_stage_or_an_external_checkpoint(write_job):
    pipeline = load_pipeline(write_job(MINIMAL), ["stages.seed.init.checkpoint=s3://models/beit-base", "stages.seed.init.format=beit"])
    init = pipeline.stages["seed"].init
    assert (init.checkpoint, init.format, init.from_) == ("s3://models/beit-base", "beit", None)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["stages.vlpt.init.checkpoint=/m", "stages.vlpt.init.format=beit"], "give exactly one of 'from' (a stage) or 'checkpoint'"),
        (["stages.seed.init.checkpoint=/m"], "stages.seed.init: Value error, 'checkpoint' needs 'format': beit, vit, vlmo or vlcluster"),
        (["stages.seed.init.checkpoint=/m", "stages.seed.init.format=clip"], "stages.seed.init.format: Input should be 'beit', 'vit', 'vlmo' or 'vlcluster'"),
        (["stages.vlpt.init.format=beit"], "'format' goes with 'checkpoint'"),
    ],
)
def test_init_errors(write_job, overrides, expected):
    with pytest.raises(SpecError) as info:
        load_pipeline(write_job(MINIMAL), overrides)
    assert expected in str(info.value)


@pytest.mark.parametrize("name", ["../outside", "a/b", "line\\nbreak", ".hidden", ""])
def test_stage_names_are_plain_directory_names(write_job, name):
    text = f'name: n\nstages:\n  "{name}": {{kind: data}}\n'
    with pytest.raises(SpecError, match="is not a valid name|name must not be empty"):
        load_pipeline(write_job(text), [])
