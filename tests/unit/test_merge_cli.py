"""`vlcluster merge`, `vlcluster metrics` and `vlcluster report` (Pearson r) on small inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support.merge_fixtures import random_state, tiny_config
from vlcluster.cli import main
from vlcluster.merge.apply import merge_state
from vlcluster.metrics import METRICS
from vlcluster.metrics.correlation import correlation_table, pearson
from vlcluster.model.files import write_model
from vlcluster.stages.rundir import StageDir, write_json_atomic


def test_merge_command_writes_the_ties_merge(tmp_path):
    state, seed = random_state("specific"), random_state("agnostic", seed=7)
    write_model(StageDir(tmp_path / "src"), state, tiny_config("specific"), {})
    write_model(StageDir(tmp_path / "seed"), seed, tiny_config("agnostic"), {})
    code = main(["merge", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--method", "ties",
                 "--base", str(tmp_path / "seed"), "--lam", "1", "--density", "0.3"])
    assert code == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = merge_state(state, "ties", base=seed, lam=1.0, density=0.3)
    assert all(torch.equal(merged[key], value) for key, value in expected.items())


def test_merge_command_without_seed_is_a_clear_error(tmp_path, capsys):
    write_model(StageDir(tmp_path / "src"), random_state("specific"), tiny_config("specific"), {})
    assert main(["merge", str(tmp_path / "src"), "-o", str(tmp_path / "out"), "--method", "arithmetic"]) == 2
    assert "needs the seed checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["taken", "taken/model"])
def test_merge_into_an_existing_file_is_one_paragraph(tmp_path, capsys, out):
    write_model(StageDir(tmp_path / "src"), random_state("specific"), tiny_config("specific"), {})
    (tmp_path / "taken").write_bytes(b"not a directory")
    assert main(["merge", str(tmp_path / "src"), "-o", str(tmp_path / out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("error:") == 1 and "Traceback" not in err and "FileExistsError" not in err
    assert err.startswith(f"error: {tmp_path / out}: -o") and "merge writes model.safetensors and model.json there" in err
    assert (tmp_path / "taken").read_bytes() == b"not a directory"


def test_metrics_command_prints_every_metric(tmp_path, capsys):
    write_model(StageDir(tmp_path / "src"), random_state("specific"), tiny_config("specific"), {})
    assert main(["metrics", str(tmp_path / "src"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(METRICS) <= set(result["overall"]) and len(result["layers"]) == 4


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=7), rng.normal(size=7)
    assert pearson(list(xs), list(ys)) == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-12)


def test_report_command_correlates_metrics_with_merge_drop(tmp_path, capsys):
    # Table 5 of the paper: K_seed 0/50k/100k/150k; drop in COCO retrieval.
    table5 = {"l2": [580.6, 496.8, 388.5, 284.6], "cosine": [.371, .264, .163, .098],
              "ssd": [.198, .161, .125, .104], "tssd": [.066, .037, .015, .006]}
    drops = [9.16, 4.50, 2.80, 2.60]
    runs = []
    for index, drop in enumerate(drops):
        run = tmp_path / f"k{index}"
        write_json_atomic(run / "metrics" / "result.json", {"overall": {name: values[index] for name, values in table5.items()}})
        write_json_atomic(run / "eval_msa" / "result.json", {"tr": 80.0, "ir": 70.0})
        write_json_atomic(run / "eval_merged" / "result.json", {"tr": 80.0 - drop, "ir": 70.0 - drop})
        runs.append(str(run))
    assert main(["report", *runs]) == 0
    out = capsys.readouterr().out
    _, correlations = correlation_table(
        {run: {"metrics": {n: v[i] for n, v in table5.items()}, "drop": drops[i]} for i, run in enumerate(runs)}, "retrieval")
    for name, values in table5.items():
        assert correlations[name] == pytest.approx(np.corrcoef(values, drops)[0, 1], abs=1e-9)
        assert f"{correlations[name]:.3f}" in out
    assert correlations["tssd"] > correlations["l2"]  # the paper's finding: TSSD predicts the drop best


@pytest.mark.parametrize(("flags", "expected"), [
    (["--alpha", "nan"], "alpha must be a finite number in [0, 1], not nan"),
    (["--alpha", "5"], "alpha must be in [0, 1], not 5"),
    (["--method", "ties", "--density", "0"], "density must be in (0, 1], not 0"),
    (["--method", "arithmetic", "--lam", "inf"], "lam must be a finite number in > 0, not inf"),
    (["--alpha-ffn", "-1"], "part_alpha must be in [0, 1], not -1"),
])
def test_merge_command_refuses_parameters_out_of_range(tmp_path, capsys, flags, expected):
    write_model(StageDir(tmp_path / "src"), random_state("specific"), tiny_config("specific"), {})
    seed = ["--base", str(tmp_path / "src")] if "--method" in flags else []
    assert main(["merge", str(tmp_path / "src"), "-o", str(tmp_path / "out"), *flags, *seed]) == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_merge_and_metrics_take_a_safetensors_file(tmp_path, capsys):
    state = random_state("specific")
    write_model(StageDir(tmp_path / "src"), state, tiny_config("specific"), {})
    weights = tmp_path / "src" / "model.safetensors"
    assert main(["merge", str(weights), "-o", str(tmp_path / "out"), "--alpha", "0.3"]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(merged[key], value) for key, value in merge_state(state, "interpolation", alpha=0.3).items())
    capsys.readouterr()
    assert main(["metrics", str(weights), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert main(["metrics", str(tmp_path / "src"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_file


def test_merge_of_a_file_of_the_wrong_kind_is_a_clear_error(tmp_path, capsys):
    write_model(StageDir(tmp_path / "src"), random_state("specific"), tiny_config("specific"), {})
    lonely = tmp_path / "lonely" / "weights.safetensors"
    lonely.parent.mkdir()
    lonely.write_bytes((tmp_path / "src" / "model.safetensors").read_bytes())
    assert main(["merge", str(lonely), "-o", str(tmp_path / "out")]) == 2
    assert "no model.json beside it" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "src" / "model.json"), "-o", str(tmp_path / "out")]) == 2
    assert "must be a stage directory" in " ".join(capsys.readouterr().err.split())
    assert main(["metrics", str(tmp_path / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_merge_of_a_safetensors_file_without_any_extra_installed(tmp_path):
    """As after the README's first install: no submitit, Ray, s3fs, UPath or validators."""
    from tests.support.cli import cli_without

    state = random_state("specific")
    write_model(StageDir(tmp_path / "src"), state, tiny_config("specific"), {})
    extras = ["submitit", "ray", "s3fs", "upath", "jsonschema", "kubernetes_validate"]
    merged = cli_without(extras, "merge", str(tmp_path / "src" / "model.safetensors"), "-o", str(tmp_path / "out"))
    assert merged.returncode == 0, merged.stderr
    expected = merge_state(state, "interpolation", alpha=0.5)
    assert all(torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))[key], value) for key, value in expected.items())
    wrong = cli_without(extras, "metrics", str(tmp_path / "src" / "model.json"))
    assert wrong.returncode == 2 and "must be a stage directory" in " ".join(wrong.stderr.split())
    assert "Traceback" not in wrong.stderr
