"""Small BEiT models that ``transformers`` builds with random weights and
saves (no download), for the checkpoint-conversion tests."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the importing test module skips without it


DIM, DEPTH, HEADS, PATCH, IMAGE = 64, 2, 4, 8, 32


def beit_config(**changes):
    """A small BEiT whose vision route vlcluster reproduces exactly: absolute positions,
    no relative position bias, [CLS] pooling after a final LayerNorm."""
    settings = dict(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=IMAGE, patch_size=PATCH, use_absolute_position_embeddings=True, use_relative_position_bias=False,
        use_mean_pooling=False, layer_norm_eps=1e-6, layer_scale_init_value=0.1,
    )
    return transformers.BeitConfig(**{**settings, **changes})


def saved_beit(path, **changes):
    torch.manual_seed(0)
    model = transformers.BeitModel(beit_config(**changes)).eval()
    with torch.no_grad():  # random, not the default init: layer scale, biases and norms all matter
        for param in model.parameters():
            param.normal_(0, 0.1) if param.ndim > 1 else param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model
