"""Every merge method against an independent float64 numpy reference on
random multiway checkpoints; strict loading of merged checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.support.merge_fixtures import ARCH_CUSTOM_PARTS, random_grams, random_model, random_state
from vlcluster.merge.apply import merge_state
from vlcluster.merge.methods import GroupInfo
from vlcluster.merge.sparse import dare_keep_mask, dare_seed
from vlcluster.model import MultiwayTransformer, load_into

TOP_LAYER = 3  # tiny: depth 4, one VL layer


def np_(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


def expert_arrays(state, key: str) -> dict[str, np.ndarray]:
    """{expert: float64 array} of the group that merges into shared key ``key``."""
    arrays = {}
    for expert in ("v", "l", "vl"):
        name = key.replace(".shared.", f".{expert}.")
        if name in state:
            arrays[expert] = np_(state[name])
    return arrays


def merged_layer_items(merged, arch="specific"):
    for key, value in merged.items():
        if key.startswith("layers.") and key.split(".")[2] in ARCH_CUSTOM_PARTS[arch]:
            yield key, value


def assert_close(value: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(np_(value), expected, rtol=1e-5, atol=1e-5)


def ref_interpolation(experts, alpha):
    merged = alpha * experts["v"] + (1 - alpha) * experts["l"]
    if "vl" in experts:
        merged = 2 / 3 * merged + 1 / 3 * experts["vl"]
    return merged


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.75, 1.0])
def test_interpolation_formula_and_two_thirds_rule(alpha):
    state = random_state("specific")
    merged = merge_state(state, "interpolation", alpha=alpha)
    for key, value in merged.items():
        if not key.startswith("layers."):
            assert torch.equal(value, state[key])  # embeddings, norm and heads pass through
            continue
        assert ".shared." in key
        experts = expert_arrays(state, key)
        assert ("vl" in experts) == key.startswith(f"layers.{TOP_LAYER}.")
        assert_close(value, ref_interpolation(experts, alpha))


def test_per_part_alpha_overrides_only_its_parts():
    state = random_state("specific")
    part_alpha = {"attn": 0.1, "ffn": None, "ln": 0.9}
    merged = merge_state(state, "interpolation", alpha=0.6, part_alpha=part_alpha)
    family = {"attn": "attn", "ffn": "ffn", "ln1": "ln", "ln2": "ln"}
    for key, value in merged_layer_items(merged):
        alpha = part_alpha[family[key.split(".")[2]]]
        assert_close(value, ref_interpolation(expert_arrays(state, key), 0.6 if alpha is None else alpha))


@pytest.mark.parametrize("lam", [0.25, 0.5, 1.0])
def test_arithmetic_adds_lambda_times_modality_vectors_to_seed(lam):
    state, seed = random_state("specific"), random_state("agnostic", seed=7)
    merged = merge_state(state, "arithmetic", base=seed, lam=lam)
    for key, value in merged_layer_items(merged):
        w0 = np_(seed[key])
        assert_close(value, w0 + lam * sum(w - w0 for w in expert_arrays(state, key).values()))


def test_arithmetic_half_equals_interpolation_half_on_bottom_layers():
    state, seed = random_state("specific"), random_state("agnostic", seed=7)
    arithmetic = merge_state(state, "arithmetic", base=seed, lam=0.5)
    interpolation = merge_state(state, "interpolation", alpha=0.5)
    for key, value in merged_layer_items(arithmetic):
        if not key.startswith(f"layers.{TOP_LAYER}."):
            torch.testing.assert_close(value, interpolation[key], rtol=1e-5, atol=1e-5)


def ref_regmean(experts, grams, gamma):
    regularised = {m: gamma * g + (1 - gamma) * np.diag(np.diag(g)) for m, g in grams.items()}
    lhs = sum(regularised.values())
    rhs = sum(regularised[m] @ experts[m].T for m in experts)  # [in, out], RegMean's layout
    return np.linalg.inv(lhs) @ rhs  # Wᵀ


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_regmean_closed_form_with_gamma(gamma):
    state = random_state("specific")
    grams = random_grams(state)
    merged = merge_state(state, "regmean", grams=grams, gamma=gamma)
    checked = 0
    for key, value in merged_layer_items(merged):
        experts = expert_arrays(state, key)
        if key.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")):
            expert_grams = {m: np_(grams[key.replace(".shared.", f".{m}.")]) for m in experts}
            np.testing.assert_allclose(np_(value), ref_regmean(experts, expert_grams, gamma).T, rtol=1e-4, atol=1e-4)
            checked += 1
        else:  # biases and LayerNorms: plain mean of the experts
            assert_close(value, sum(experts.values()) / len(experts))
    assert checked == 4 * 4  # four linear weights in each of four layers


def test_regmean_with_gamma_zero_is_a_per_input_weighted_mean():
    # γ = 0 keeps only diag(G): each input column is a G_ii-weighted mean of the experts.
    state = random_state("specific")
    grams = random_grams(state)
    merged = merge_state(state, "regmean", grams=grams, gamma=0.0)
    key = "layers.0.ffn.shared.fc1.weight"
    v, l = np_(state["layers.0.ffn.v.fc1.weight"]), np_(state["layers.0.ffn.l.fc1.weight"])
    gv, gl = np.diag(np_(grams["layers.0.ffn.v.fc1.weight"])), np.diag(np_(grams["layers.0.ffn.l.fc1.weight"]))
    assert_close(merged[key], (v * gv + l * gl) / (gv + gl))


def test_regmean_missing_gram_is_an_error():
    state = random_state("specific")
    grams = random_grams(state)
    del grams["layers.3.attn.vl.proj.weight"]
    with pytest.raises(ValueError, match=r"no Gram matrix for layers\.3\.attn\.vl\.proj\.weight"):
        merge_state(state, "regmean", grams=grams, gamma=1.0)


def ref_trim(vector: np.ndarray, density: float) -> np.ndarray:
    flat = np.abs(vector).ravel()
    keep = math.ceil(density * flat.size)
    if keep >= flat.size:
        return vector.copy()
    threshold = np.sort(flat)[flat.size - keep - 1]
    return np.where(np.abs(vector) > threshold, vector, 0.0)


@pytest.mark.parametrize(("lam", "density"), [(1.0, 0.2), (0.5, 0.5), (1.0, 1.0)])
def test_ties_trim_elect_disjoint_mean(lam, density):
    state, seed = random_state("specific"), random_state("agnostic", seed=7)
    merged = merge_state(state, "ties", base=seed, lam=lam, density=density)
    for key, value in merged_layer_items(merged):
        w0 = np_(seed[key])
        trimmed = np.stack([ref_trim(w - w0, density) for w in expert_arrays(state, key).values()])
        elected = np.sign(trimmed.sum(axis=0))
        agree = (np.sign(trimmed) == elected) & (trimmed != 0)
        disjoint_mean = (trimmed * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
        assert_close(value, w0 + lam * disjoint_mean)


def test_ties_keeps_the_requested_fraction():
    from vlcluster.merge.sparse import trim_to_density

    vector = torch.randn(1000)
    assert int((trim_to_density(vector, 0.2) != 0).sum()) == 200


@pytest.mark.parametrize("density", [0.3, 0.9])
def test_dare_drop_and_rescale(density):
    state, seed = random_state("specific"), random_state("agnostic", seed=7)
    merged = merge_state(state, "dare", base=seed, lam=0.5, density=density, random_seed=3)
    again = merge_state(state, "dare", base=seed, lam=0.5, density=density, random_seed=3)
    other = merge_state(state, "dare", base=seed, lam=0.5, density=density, random_seed=4)
    kept = total = 0
    for key, value in merged_layer_items(merged):
        assert torch.equal(value, again[key])  # seeded: reproducible
        layer, part, _, rest = key.split(".", 4)[1:]
        info = GroupInfo(int(layer), part, rest)
        w0, expected = np_(seed[key]), np_(seed[key]).copy()
        for expert, weight in expert_arrays(state, key).items():
            mask = dare_keep_mask(value.shape, density, dare_seed(3, info, expert)).numpy()
            expected += 0.5 * np.where(mask, (weight - w0) / density, 0.0)
            kept, total = kept + mask.sum(), total + mask.size
        assert_close(value, expected)
    assert abs(kept / total - density) < 0.01  # masks really are Bernoulli(density)
    assert any(not torch.equal(value, other[key]) for key, value in merged_layer_items(merged))


@pytest.mark.parametrize("arch", sorted(ARCH_CUSTOM_PARTS))
@pytest.mark.parametrize("method", ["interpolation", "arithmetic", "regmean", "ties", "dare"])
def test_every_method_and_arch_loads_strictly_into_agnostic_model(arch, method):
    model = random_model(arch)
    state = model.state_dict()
    extra = {"base": random_state("agnostic", seed=7), "grams": random_grams(state)}
    merged = merge_state(state, method, alpha=0.5, lam=0.5, gamma=0.9, density=0.5, random_seed=0, **extra)
    agnostic = MultiwayTransformer(model.config.with_arch("agnostic"), heads=("itc", "vqa"))
    load_into(agnostic, merged, allow_missing_prefixes=())
    # Shared parts of a shared-weight variant are copied, not merged.
    for key, value in merged.items():
        parts = key.split(".")
        if key.startswith("layers.") and parts[2] not in ARCH_CUSTOM_PARTS[arch]:
            assert torch.equal(value, state[key])
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 40, (2, 12))
    assert agnostic.fusion(images, ids).shape == (2, 1 + agnostic.config.num_patches + 12, agnostic.config.dim)


@pytest.mark.parametrize("method", ["interpolation", "arithmetic", "regmean", "ties", "dare"])
def test_relative_position_bias_is_copied_by_every_method(method):
    """The bias tables are shared by a layer's experts (outside ``layers.*.{part}.{expert}``):
    merging copies them, as it copies layer scale and the embeddings."""
    model = random_model("specific", position="relative")
    state = model.state_dict()
    extra = {"base": random_state("agnostic", seed=7, position="relative"), "grams": random_grams(state)}
    merged = merge_state(state, method, alpha=0.5, lam=0.5, gamma=0.9, density=0.5, random_seed=0, **extra)
    for name in ("image", "cross", "text"):
        assert torch.equal(merged[f"position_bias.{name}"], state[f"position_bias.{name}"])
    agnostic = MultiwayTransformer(model.config.with_arch("agnostic"), heads=("itc", "vqa"))
    load_into(agnostic, merged, allow_missing_prefixes=())
    assert agnostic.fusion(torch.randn(2, 3, 32, 32), torch.randint(5, 40, (2, 12))).isfinite().all()


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_state(random_state("specific"), "average-ish")


def test_methods_needing_the_seed_refuse_to_run_without_it():
    with pytest.raises(ValueError, match="needs the seed checkpoint"):
        merge_state(random_state("specific"), "arithmetic", lam=0.5)
