"""Mergeability metrics on hand-made vectors with known answers and against a
float64 numpy reference (sort-based TSSD) on random checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.support.merge_fixtures import random_state
from vlcluster.metrics.distance import Pair, checkpoint_distances, distances, vl_pairs


def metrics_of(x, y, density=0.5) -> dict:
    return distances({0: [Pair(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))]}, density)["overall"]


def test_identical_vectors_are_at_distance_zero():
    result = metrics_of([1.0, -2.0, 3.0, 0.5], [1.0, -2.0, 3.0, 0.5])
    assert result["l2"] == 0 and result["ssd"] == 0 and result["tssd"] == 0
    assert result["cosine"] == pytest.approx(0, abs=1e-7)


def test_opposite_signs_give_ssd_one_and_cosine_two():
    result = metrics_of([1.0, -2.0, 3.0], [-1.0, 2.0, -3.0])
    assert result["ssd"] == 1 and result["cosine"] == pytest.approx(2)
    assert result["l2"] == pytest.approx(2 * math.sqrt(14))


def test_hand_made_ssd_and_tssd():
    x = [4.0, 3.0, -0.1, 0.2, 0.0, 1.0]
    y = [4.0, -1.0, 0.3, 0.0, 0.0, -5.0]
    # SSD: pairs (4,4)=1, (3,-1)=2/4, (-.1,.3)=.2/.4, (.2,0)=1, (0,0) excluded, (1,-5)=4/6
    ssd = 1 - (1 + 0.5 + 0.5 + 1 + 4 / 6) / 5
    # TSSD, density .5: x keeps 4, 3, 1 (drops .2, .1, 0); y keeps 4, -5, -1 (drops .3, 0, 0)
    # kept positions 0, 1, 5 -> ratios 1, 2/4, 4/6
    tssd = 1 - (1 + 0.5 + 4 / 6) / 3
    result = metrics_of(x, y)
    assert result["ssd"] == pytest.approx(ssd, abs=1e-7)
    assert result["tssd"] == pytest.approx(tssd, abs=1e-7)


def test_tssd_one_survivor_counts_as_agreement():
    # x keeps the 10 (position 0), y keeps the 7 (position 1): each survivor alone gives ratio 1.
    result = metrics_of([10.0, 0.1], [0.2, 7.0])
    assert result["tssd"] == 0


def ref_metrics(x: np.ndarray, y: np.ndarray, density: float) -> dict:
    def ssd(a, b):
        valid = (a != 0) | (b != 0)
        return 1 - np.mean(np.abs(a[valid] + b[valid]) / (np.abs(a[valid]) + np.abs(b[valid])))

    def trim(a):
        drop = a.size - math.ceil(density * a.size)
        threshold = np.sort(np.abs(a))[drop - 1]
        return np.where(np.abs(a) > threshold, a, 0.0)

    return {
        "l2": np.linalg.norm(x - y),
        "cosine": 1 - x @ y / (np.linalg.norm(x) * np.linalg.norm(y)),
        "ssd": ssd(x, y),
        "tssd": ssd(trim(x), trim(y)),
    }


@pytest.mark.parametrize("density", [0.5, 0.2])
def test_checkpoint_metrics_match_float64_reference_per_layer_and_overall(tmp_path, density):
    state = random_state("specific")
    seed = random_state("specific", seed=3)
    # Make V and L related (as after VL pre-training from one seed) with some exact zeros.
    for key in state:
        if ".l." in key:
            state[key] = 0.8 * state[key.replace(".l.", ".v.")] + 0.3 * seed[key]
    state["layers.1.ffn.v.fc2.bias"][:10] = 0
    state["layers.1.ffn.l.fc2.bias"][:5] = 0
    save_file(state, str(tmp_path / "model.safetensors"))
    result = checkpoint_distances(tmp_path / "model.safetensors", density)
    pairs = vl_pairs(state)
    assert sorted(result["layers"]) == [0, 1, 2, 3] and all(len(p) == 12 for p in pairs.values())

    def flat(keys):
        return np.concatenate([state[k].double().numpy().ravel() for k in keys])

    scopes = {"overall": [p for layer in pairs.values() for p in layer], **{layer: p for layer, p in pairs.items()}}
    for scope, keys in scopes.items():
        got = result["overall"] if scope == "overall" else result["layers"][scope]
        expected = ref_metrics(flat(k for k, _ in keys), flat(k for _, k in keys), density)
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-7), (scope, name)


def test_relative_position_bias_is_not_a_vl_pair(tmp_path):
    """Metrics compare V and L experts only; the bias tables are shared by them."""
    state = random_state("specific", position="relative")
    assert "position_bias.image" in state
    save_file(state, str(tmp_path / "relative.safetensors"))
    without = {key: value for key, value in state.items() if not key.startswith("position_bias.")}
    save_file(without, str(tmp_path / "without.safetensors"))
    assert checkpoint_distances(tmp_path / "relative.safetensors") == checkpoint_distances(tmp_path / "without.safetensors")


def test_agnostic_checkpoint_has_nothing_to_measure(tmp_path):
    save_file(random_state("agnostic"), str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="no layer has both a V and an L expert"):
        checkpoint_distances(tmp_path / "m.safetensors")
