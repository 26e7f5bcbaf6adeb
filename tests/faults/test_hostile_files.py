"""Damaged or forged files where vlcluster reads them: safetensors files,
model.json, run-dir records. Every one is a clear error naming the file (or
a record treated as absent), never a traceback."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from vlcluster.cli import main
from vlcluster.model.config import preset
from vlcluster.model.files import read_model, read_model_config
from vlcluster.stages.outputs import read_result
from vlcluster.stages.rundir import stage_dir
from vlcluster.storage.tensorfile import TensorFile, TensorFileError, load_tensors


def header_file(path, header: bytes, length: int | None = None, data: bytes = b"") -> str:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return str(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "shorter than the 8-byte header length"),
        (b"\x01\x02\x03", "shorter than the 8-byte header length"),
        (struct.pack("<Q", 2**63) + b"{}", "header length 9223372036854775808"),
        (struct.pack("<Q", 4) + b"{]  ", "header is not JSON"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "header is not JSON"),
        (struct.pack("<Q", 8) + b"[1, 2]  ", "header is not a JSON object"),
        (struct.pack("<Q", 16) + b'{"a": [0, 1]}   ', "tensor 'a': entry is not an object"),
        (struct.pack("<Q", 64) + json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(64), "truncated"),
        (struct.pack("<Q", 64) + json.dumps({"a": {"dtype": "F99", "shape": [], "data_offsets": [0, 4]}}).encode().ljust(64), "unsupported dtype"),
        (struct.pack("<Q", 72) + json.dumps({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode().ljust(72), "bad shape"),
        (struct.pack("<Q", 72) + json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}).encode().ljust(72), "bad data_offsets"),
        (struct.pack("<Q", 64) + json.dumps({"__metadata__": [1]}).encode().ljust(64), "__metadata__ is not a JSON object"),
    ],
)
def test_broken_safetensors_name_the_file(tmp_path, content, expected):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(TensorFileError) as info:
        load_tensors(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_reader_matches_the_reference_writer(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "h": torch.ones(2, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "ok.safetensors"), metadata={"format": "pt"})
    loaded = load_tensors(tmp_path / "ok.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with TensorFile(tmp_path / "ok.safetensors") as source:
        assert source.metadata == {"format": "pt"}


def model_dir(tmp_path, config: object, weights: bytes | None = None):
    directory = stage_dir(tmp_path / "run", "seed")
    directory.root.mkdir(parents=True)
    (directory.root / "model.json").write_text(json.dumps({"config": config}))
    if weights is None:
        save_file({"x": torch.zeros(2)}, str(directory.model_weights))
    else:
        directory.model_weights.write_bytes(weights)
    return directory


GOOD = preset("tiny", "specific").to_dict()


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({**GOOD, "heads": 0}, "heads must be positive"),
        ({**GOOD, "dim": "64"}, "dim must be an integer"),
        ({**GOOD, "depth": True}, "depth must be an integer"),
        ({**GOOD, "mlp_ratio": float("inf")}, "mlp_ratio must be a number"),
        ({**GOOD, "vl_layers": 99}, "vl_layers: must be in"),
        ({k: v for k, v in GOOD.items() if k != "dim"}, "missing ModelConfig keys: ['dim']"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_invalid_model_json_is_one_error(tmp_path, config, expected):
    directory = model_dir(tmp_path, config)
    for read in (lambda: read_model(directory), lambda: read_model_config(directory.root)):
        with pytest.raises(ValueError) as info:
            read()
        assert str(directory.model_config) in str(info.value) and expected in str(info.value)


def test_truncated_model_weights_name_the_file(tmp_path):
    directory = model_dir(tmp_path, GOOD, weights=b"\x00" * 5)
    with pytest.raises(TensorFileError, match="model.safetensors: not a safetensors file"):
        read_model(directory)


@pytest.mark.parametrize("content", [b"[1, 2]", b'"done"', b"\xff\xfe", b"{" * 100000, b"1" * 5000, b""])
def test_records_of_the_wrong_type_count_as_absent(tmp_path, content):
    directory = stage_dir(tmp_path, "seed")
    directory.root.mkdir(parents=True)
    for name in ("state.json", "_SUCCESS", "result.json"):
        (directory.root / name).write_bytes(content)
    assert directory.read_state() == {}
    assert directory.done_hash() is None
    assert read_result(directory) is None


def test_state_fields_of_the_wrong_type_are_dropped(tmp_path):
    directory = stage_dir(tmp_path, "seed")
    directory.root.mkdir(parents=True)
    directory.state_file.write_text(json.dumps({"state": ["running"], "pid": 2**80, "started": "yesterday", "backend": "local", "extra": 1}))
    assert directory.read_state() == {"backend": "local", "extra": 1}


def test_cli_on_damaged_files_prints_one_error(tmp_path, capsys):
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x07")
    assert main(["metrics", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "m.safetensors" in err and "Traceback" not in err

    directory = model_dir(tmp_path, {**GOOD, "heads": 0})
    assert main(["merge", str(directory.root), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "heads must be positive" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "payload",
    [[1], {"pipeline": []}, {"pipeline": {"name": "x", "stages": {"..": {"kind": "data"}}}}, {"pipeline": {"stages": 3}}],
)
def test_status_on_a_damaged_pipeline_record(tmp_path, capsys, payload):
    (tmp_path / "pipeline.json").write_text(json.dumps(payload))
    assert main(["status", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pipeline.json" in err


def test_report_on_damaged_results(tmp_path, capsys):
    for stage, content in (("metrics", {"overall": [1]}), ("eval_merged", {"tr": 1}), ("eval_msa", {"tr": "x"})):
        directory = stage_dir(tmp_path, stage)
        directory.root.mkdir(parents=True)
        directory.result_file.write_text(json.dumps(content))
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics stage: no 'overall' object" in capsys.readouterr().err
