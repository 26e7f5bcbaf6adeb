"""Checkpoint directory protocol: atomic commit, pruning, spec isolation."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from vlcluster.train import checkpoint as ckpt
from vlcluster.train.dist import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def save(root, step, spec_hash="h1", keep=3, value=0.0):
    model = {"w": torch.full((2, 2), value)}
    optim = {
        "state": {"w": {"step": torch.tensor(float(step)), "exp_avg": torch.ones(2, 2) * value}},
        "param_groups": [{"lr": 0.1, "params": ["w"]}],
    }
    return ckpt.save_checkpoint(
        root, step, ENV, model, optim, {"spec_hash": spec_hash, "world_size": 1},
        {"torch_rng": torch.get_rng_state()}, {"loader": {"epoch": 0, "offset": step}}, keep,
    )


def test_round_trip(tmp_path):
    save(tmp_path, 5, value=1.5)
    latest = ckpt.latest_checkpoint(tmp_path, "h1")
    loaded = ckpt.load_checkpoint(latest, rank=0)
    assert loaded.step == 5
    assert torch.equal(loaded.model_state["w"], torch.full((2, 2), 1.5))
    assert loaded.optim_state["state"]["w"]["step"].item() == 5
    assert torch.equal(loaded.optim_state["state"]["w"]["exp_avg"], torch.full((2, 2), 1.5))
    assert loaded.optim_state["param_groups"] == [{"lr": 0.1, "params": ["w"]}]
    assert loaded.rank_info == {"loader": {"epoch": 0, "offset": 5}}


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path):
    save(tmp_path, 10, value=1.0)
    # A crash while writing step 20: files partly there, never renamed.
    partial = tmp_path / "step_00000020.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00truncated")
    latest = ckpt.latest_checkpoint(tmp_path, "h1")
    assert latest.step == 10
    assert torch.equal(ckpt.load_checkpoint(latest, 0).model_state["w"], torch.ones(2, 2))


def test_keep_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path)] == [3, 4]


def test_checkpoints_of_another_spec_are_not_resumed_and_are_discarded(tmp_path):
    save(tmp_path, 7, spec_hash="old")
    (tmp_path / "step_00000009.partial").mkdir()
    assert ckpt.latest_checkpoint(tmp_path, "new") is None
    assert ckpt.discard_foreign(tmp_path, "new") == [7]
    assert list(tmp_path.iterdir()) == []


def test_files_are_plain_safetensors(tmp_path):
    path = save(tmp_path, 3)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["meta.json", "model.safetensors", "optim.safetensors", "rank_0.json", "rank_0.safetensors"]
    assert set(load_file(str(path / "optim.safetensors"))) == {"w/step", "w/exp_avg"}


# ---- damaged checkpoints: verified on resume, the newest intact one is used ----

import json  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_64k(path):
    data = bytearray(path.read_bytes())
    start = min(8 + 64, max(len(data) - 65536, 0))
    data[start : start + 65536] = bytes(len(data[start : start + 65536]))
    path.write_bytes(bytes(data))


def flip_bit(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def remove(path):
    path.unlink()


@pytest.mark.parametrize("damage", [truncate, zero_64k, flip_bit, remove])
@pytest.mark.parametrize("name", ["model.safetensors", "optim.safetensors", "rank_0.safetensors", "rank_0.json"])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, caplog, damage, name):
    save(tmp_path, 10, value=1.0)
    save(tmp_path, 20, value=2.0)
    damage(tmp_path / "step_00000020" / name)
    with caplog.at_level(logging.WARNING):
        loaded = ckpt.load_intact_checkpoint(tmp_path, "h1", ENV)
    assert loaded.step == 10 and torch.equal(loaded.model_state["w"], torch.ones(2, 2))
    reason = "missing" if damage is remove else ("sha256 mismatch" if damage in (zero_64k, flip_bit) else "bytes")
    assert f"step_00000020 is damaged ({name}: " in caplog.text and reason in caplog.text
    assert "resuming from step_00000010" in caplog.text
    assert [c.step for c in ckpt.complete_checkpoints(tmp_path)] == [10]  # set aside, out of plan/status
    assert (tmp_path / "step_00000020.damaged").is_dir()


def test_every_checkpoint_damaged_starts_over(tmp_path, caplog):
    save(tmp_path, 10)
    truncate(tmp_path / "step_00000010" / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        assert ckpt.load_intact_checkpoint(tmp_path, "h1", ENV) is None
    assert "no intact checkpoint left; starting from the beginning" in caplog.text


def test_commit_marker_records_every_file(tmp_path):
    path = save(tmp_path, 3)
    files = json.loads((path / "meta.json").read_text())["files"]
    assert sorted(files) == ["model.safetensors", "optim.safetensors", "rank_0.json", "rank_0.safetensors"]
    for name, record in files.items():
        assert record["bytes"] == (path / name).stat().st_size and len(record["sha256"]) == 64


def test_missing_rank_file_is_damage_not_a_world_size_change(tmp_path):
    path = save(tmp_path, 3)
    (path / "rank_0.safetensors").unlink()
    with pytest.raises(ckpt.DamagedCheckpoint, match=r"rank_0.safetensors: missing"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path, "h1"), 0)


def test_another_world_size_loads_with_every_saving_ranks_record(tmp_path):
    save(tmp_path, 3)
    for rank in (0, 1):
        grown = DistEnv(rank=rank, world_size=2, local_rank=0, device=torch.device("cpu"))
        loaded = ckpt.load_intact_checkpoint(tmp_path, "h1", grown)
        assert loaded.step == 3 and loaded.saved_world == 1
        assert loaded.rank_info == {"loader": {"epoch": 0, "offset": 3}}  # rank r takes saving rank r mod 1
        assert loaded.saved_rank_info == [loaded.rank_info]  # the data position and bad-data counts of all of them
    assert ckpt.load_intact_checkpoint(tmp_path, "h1", ENV).saved_rank_info is None  # same world size: its own only
