"""Random multiway checkpoints (every parameter random, experts differ) and
random Gram matrices, shared by the merge and metrics tests."""

from __future__ import annotations

from functools import lru_cache

import torch

from vlcluster.merge.regmean import needs_gram
from vlcluster.model import MultiwayTransformer, parse_layer_key, preset

ARCH_CUSTOM_PARTS = {
    "specific": {"attn", "ffn", "ln1", "ln2"},
    "custom_attn": {"attn"},
    "custom_ffn": {"ffn"},
    "custom_ln": {"ln1", "ln2"},
}


def tiny_config(arch: str, position: str = "absolute"):
    return preset("tiny", arch, vocab_size=40, num_answers=7, max_text_len=12, position=position)


def random_model(arch: str, seed: int = 0, position: str = "absolute") -> MultiwayTransformer:
    torch.manual_seed(seed)
    model = MultiwayTransformer(tiny_config(arch, position), heads=("itc", "vqa"))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()  # experts differ everywhere, LNs included
    return model


@lru_cache(maxsize=None)
def _cached_state(arch: str, seed: int, position: str) -> dict[str, torch.Tensor]:
    return random_model(arch, seed, position).state_dict()


def random_state(arch: str, seed: int = 0, position: str = "absolute") -> dict[str, torch.Tensor]:
    """A fresh copy each call (tests may modify it); built once per (arch, seed, position)."""
    return {key: value.clone() for key, value in _cached_state(arch, seed, position).items()}


def random_grams(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """A random SPD float64 Gram (XᵀX/n of random inputs) for every expert linear weight."""
    generator = torch.Generator().manual_seed(seed)
    grams = {}
    for key, weight in state.items():
        parsed = parse_layer_key(key)
        if parsed and parsed[2] != "shared" and needs_gram(parsed[1], parsed[3]):
            inputs = torch.randn(3 * weight.shape[1], weight.shape[1], generator=generator, dtype=torch.float64)
            grams[key] = inputs.T @ inputs / inputs.shape[0]
    return grams
