"""Streaming merge: the raw safetensors reader/writer against the reference
library, and streamed checkpoints bitwise identical to the in-memory merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.support.merge_fixtures import random_grams, random_state, tiny_config
from vlcluster.merge.apply import merge_checkpoint, merge_state
from vlcluster.storage.tensorfile import TensorFile, TensorFileWriter
from vlcluster.model.files import file_sha256, weights_sha256, write_model
from vlcluster.stages.rundir import StageDir

MIXED = {
    "w": torch.randn(3, 5),
    "half": torch.randn(7).half(),
    "brain": torch.randn(2, 3).bfloat16(),
    "steps": torch.arange(4, dtype=torch.int64),
    "double": torch.randn(2, dtype=torch.float64),
    "scalar": torch.tensor(1.5),
    "empty": torch.zeros(0, 4),
    "flags": torch.tensor([True, False, True]),
}


def test_writer_output_reads_back_with_safetensors(tmp_path):
    path = tmp_path / "mixed.safetensors"
    writer = TensorFileWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in MIXED.items()}, {"format": "pt"})
    for key in writer.order:
        writer.write(key, MIXED[key])
    writer.close()
    loaded = load_file(str(path))
    assert loaded.keys() == MIXED.keys()
    for key, value in MIXED.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_reader_reads_what_safetensors_wrote(tmp_path):
    path = tmp_path / "ref.safetensors"
    save_file(MIXED, str(path), metadata={"who": "reference"})
    with TensorFile(path) as source:
        assert source.metadata == {"who": "reference"}
        assert set(source.keys()) == MIXED.keys()
        for key, value in MIXED.items():
            assert torch.equal(source.read(key), value), key


def test_writer_refuses_out_of_order_and_incomplete_files(tmp_path):
    layout = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    writer = TensorFileWriter(tmp_path / "x.safetensors", layout)
    with pytest.raises(ValueError, match="out of order"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="never written"):
        writer.close()


def write_stage(root, state, arch: str) -> None:
    write_model(StageDir(root), state, tiny_config(arch), {"test": True})


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("interpolation", {"alpha": 0.75, "part_alpha": {"attn": 0.3, "ffn": None, "ln": None}}),
        ("arithmetic", {"lam": 0.5}),
        ("regmean", {"gamma": 0.8}),
        ("ties", {"lam": 1.0, "density": 0.3}),
        ("dare", {"lam": 0.5, "density": 0.5, "random_seed": 2}),
    ],
)
@pytest.mark.parametrize("arch", ["specific", "custom_ffn"])
def test_streamed_merge_is_bitwise_identical_to_in_memory(tmp_path, method, params, arch):
    state, seed = random_state(arch), random_state("agnostic", seed=7)
    grams = random_grams(state)
    write_stage(tmp_path / "src", state, arch)
    write_stage(tmp_path / "seed", seed, "agnostic")
    save_file(grams, str(tmp_path / "grams.safetensors"))
    record = merge_checkpoint(
        tmp_path / "src", tmp_path / "out", method, params, base=tmp_path / "seed", grams=tmp_path,
    )
    streamed = load_file(str(tmp_path / "out" / "model.safetensors"))
    in_memory = merge_state(state, method, base=seed, grams=grams, **params)
    assert streamed.keys() == in_memory.keys()
    for key, value in in_memory.items():
        assert streamed[key].dtype == value.dtype and torch.equal(streamed[key], value), key
    model_json = json.loads((tmp_path / "out" / "model.json").read_text())
    assert model_json["config"]["arch"] == "agnostic"
    provenance = model_json["provenance"]
    assert provenance == record and provenance["method"] == method and provenance["params"] == params
    assert provenance["inputs"]["source"]["sha256"] == file_sha256(tmp_path / "src" / "model.safetensors")
    assert provenance["inputs"]["grams"]["sha256"] == file_sha256(tmp_path / "grams.safetensors")


def test_weights_digest_is_recorded_at_write_and_recomputed_after_a_change(tmp_path):
    import hashlib

    write_stage(tmp_path / "m", random_state("agnostic"), "agnostic")
    weights, record_file = tmp_path / "m" / "model.safetensors", tmp_path / "m" / "model.json"
    record = json.loads(record_file.read_text())
    assert record["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["weights"]["bytes"] == weights.stat().st_size

    record["weights"]["sha256"] = "recorded"  # an unchanged file is not re-read
    record_file.write_text(json.dumps(record))
    assert weights_sha256(tmp_path / "m") == "recorded"

    save_file({"x": torch.ones(3)}, str(weights))  # rewritten: size and mtime differ
    assert weights_sha256(tmp_path / "m") == hashlib.sha256(weights.read_bytes()).hexdigest()
