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
