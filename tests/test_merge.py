"""Interpolation merge against an independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlcluster.merge.apply import merge_state
from vlcluster.model import MultiwayTransformer, load_into, preset

ARCH_CUSTOM_PARTS = {
    "specific": {"attn", "ffn", "ln1", "ln2"},
    "custom_attn": {"attn"},
    "custom_ffn": {"ffn"},
    "custom_ln": {"ln1", "ln2"},
}


def random_model(arch: str) -> MultiwayTransformer:
    torch.manual_seed(0)
    config = preset("tiny", arch, vocab_size=40, num_answers=7, max_text_len=12)
    model = MultiwayTransformer(config, heads=("itc", "vqa"))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()  # experts differ everywhere, LNs included
    return model


def reference_interpolation(state, layer, part, rest, alpha, top):
    v = state[f"layers.{layer}.{part}.v.{rest}"].double().numpy()
    l = state[f"layers.{layer}.{part}.l.{rest}"].double().numpy()
    merged = alpha * v + (1 - alpha) * l
    if top:
        merged = 2 / 3 * merged + 1 / 3 * state[f"layers.{layer}.{part}.vl.{rest}"].double().numpy()
    return merged


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.75, 1.0])
def test_interpolation_formula_and_two_thirds_rule(alpha):
    model = random_model("specific")
    state = model.state_dict()
    merged = merge_state(state, "interpolation", alpha=alpha)
    config = model.config
    for key, value in merged.items():
        if not key.startswith("layers."):
            assert torch.equal(value, state[key])  # embeddings, norm and heads pass through
            continue
        _, layer, part, expert, rest = key.split(".", 4)
        assert expert == "shared"
        top = int(layer) >= config.bottom_layers
        expected = reference_interpolation(state, layer, part, rest, alpha, top)
        np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(ARCH_CUSTOM_PARTS))
def test_merged_checkpoint_loads_strictly_into_agnostic_model(arch):
    model = random_model(arch)
    state = model.state_dict()
    merged = merge_state(state, "interpolation", alpha=0.5)
    agnostic = MultiwayTransformer(model.config.with_arch("agnostic"), heads=("itc", "vqa"))
    load_into(agnostic, merged, allow_missing_prefixes=())
    # Shared parts of a shared-weight variant are copied, not averaged.
    for key, value in merged.items():
        parts = key.split(".")
        if key.startswith("layers.") and parts[2] not in ARCH_CUSTOM_PARTS[arch]:
            assert torch.equal(value, state[key])
    images = torch.randn(2, 3, 32, 32)
    ids = torch.randint(5, 40, (2, 12))
    assert agnostic.fusion(images, ids).shape == (2, 1 + agnostic.config.num_patches + 12, agnostic.config.dim)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_state(random_model("specific").state_dict(), "average-ish")
