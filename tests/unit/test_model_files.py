"""Every kind of model file vlcluster writes is read by `merge`, `metrics` and
`load_model`: stage directories, training checkpoints (``checkpoints/step_N``,
whose weights carry the training objective's ``model.`` prefix), converted
directories and the ``.safetensors`` file of each; and `metrics --checkpoints`
gives the distances along training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlcluster
from tests.support.merge_fixtures import random_state, tiny_config
from vlcluster.cli import main
from vlcluster.merge.apply import merge_state
from vlcluster.metrics import METRICS
from vlcluster.metrics.distance import checkpoint_distances
from vlcluster.model.external import convert_to_model_dir, export_vlmo
from vlcluster.model.files import write_model
from vlcluster.stages.rundir import StageDir
from vlcluster.train import checkpoint as ckpt
from vlcluster.train.dist import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def save_training_checkpoint(root: Path, step: int, state: dict[str, torch.Tensor]) -> Path:
    """As the trainer saves it: the objective's state (the model under ``model.``, plus the
    objective's own tensors), meta.json with the model config."""
    objective = {f"model.{key}": value for key, value in state.items()} | {"logit_scale": torch.tensor(2.5)}
    meta = {"spec_hash": "h", "world_size": 1, "model_config": tiny_config("specific").to_dict()}
    return ckpt.save_checkpoint(root, step, ENV, objective, {"state": {}, "param_groups": []}, meta, {}, {}, keep=10)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """One model as every kind of file: {kind: path}."""
    root = tmp_path_factory.mktemp("model-files")
    state = random_state("specific")
    write_model(StageDir(root / "stage"), state, tiny_config("specific"), {"stage": "vlpt"})
    step = save_training_checkpoint(root / "stage" / "checkpoints", 300, state)
    export_vlmo(str(root / "stage"), str(root / "vlmo.safetensors"))
    convert_to_model_dir(str(root / "vlmo.safetensors"), "vlmo", str(root / "converted"), size="tiny", heads=tiny_config("specific").heads)
    return {
        "stage directory": root / "stage",
        "stage weights file": root / "stage" / "model.safetensors",
        "training checkpoint": step,
        "training checkpoint weights file": step / "model.safetensors",
        "converted directory": root / "converted",
        "converted weights file": root / "converted" / "model.safetensors",
    }


KINDS = ["stage directory", "stage weights file", "training checkpoint", "training checkpoint weights file",
         "converted directory", "converted weights file"]


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_reads_every_kind_of_model_file(model_files, kind, capsys):
    assert main(["metrics", str(model_files[kind]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = checkpoint_distances(model_files["stage weights file"])  # the same model: the same distances
    assert result["overall"] == pytest.approx(expected["overall"], rel=1e-12)
    assert set(METRICS) <= set(result["overall"]) and len(result["layers"]) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_load_model_read_every_kind_of_model_file(model_files, kind, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(model_files[kind]), "-o", str(out), "--alpha", "0.3"]) == 0
    merged = load_file(str(out / "model.safetensors"))
    expected = merge_state(random_state("specific"), "interpolation", alpha=0.3)
    assert merged.keys() == expected.keys()  # the objective's own tensors (logit_scale) are not the model's
    assert all(torch.equal(merged[key], value) for key, value in expected.items())
    provenance = json.loads((out / "model.json").read_text())["provenance"]
    assert provenance["source_arch"] == "specific" and provenance["inputs"]["source"]["path"].endswith("model.safetensors")
    loaded = vlcluster.load_model(model_files[kind])
    reference = random_state("specific")
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())


def test_metrics_along_training_one_row_per_checkpoint(tmp_path, capsys):
    """Experts that drift apart step by step: the table's distances grow with the step."""
    stage = tmp_path / "vlpt"
    start, drift = random_state("specific"), random_state("specific", seed=5)
    write_model(StageDir(stage), start, tiny_config("specific"), {"stage": "vlpt"})
    for step, scale in ((100, 0.1), (200, 0.5), (300, 1.0)):
        moved = {key: value + scale * drift[key] if ".l." in key else value for key, value in start.items()}
        save_training_checkpoint(stage / "checkpoints", step, moved)
    assert main(["metrics", str(stage), "--checkpoints", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["step"] for row in rows] == [100, 200, 300]
    for row in rows:
        single = checkpoint_distances(stage / "checkpoints" / f"step_{row['step']:08d}" / "model.safetensors", prefix="model.")
        assert row == {"step": row["step"], **{name: pytest.approx(single["overall"][name], rel=1e-12) for name in METRICS}}
    assert rows[0]["l2"] < rows[1]["l2"] < rows[2]["l2"]

    figure = tmp_path / "along.png"
    assert main(["metrics", str(stage), "--checkpoints", "--figure", str(figure)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| step | " + " | ".join(METRICS) + " |" and [line.split("|")[1].strip() for line in table[2:]] == ["100", "200", "300"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_along_training_without_checkpoints_is_one_paragraph(tmp_path, capsys):
    write_model(StageDir(tmp_path / "merged"), random_state("agnostic"), tiny_config("agnostic"), {})
    assert main(["metrics", str(tmp_path / "merged"), "--checkpoints"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1 and "no finished training checkpoints" in err and "Traceback" not in err
    assert main(["metrics", str(tmp_path / "merged"), "--figure", str(tmp_path / "x.png")]) == 2
    assert "with --checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_convert_to_vlmo_reads_every_kind_of_model_file(model_files, kind, tmp_path):
    assert main(["convert", "--to", "vlmo", str(model_files[kind]), "-o", str(tmp_path / "vlmo.safetensors")]) == 0
    assert main(["convert", "--to", "vlmo", str(model_files["stage directory"]), "-o", str(tmp_path / "reference.safetensors")]) == 0
    exported, reference = load_file(str(tmp_path / "vlmo.safetensors")), load_file(str(tmp_path / "reference.safetensors"))
    assert exported.keys() == reference.keys() and all(torch.equal(exported[key], reference[key]) for key in reference)
