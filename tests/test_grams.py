"""RegMean statistics: hooks see every expert's linear inputs, padding is
masked, Grams are normalised by token count and accumulated in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.merge_fixtures import random_model
from vlcluster.merge.grams import collect_grams


def batches(seed: int = 0, count: int = 2):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        images = torch.randn(3, 3, 32, 32, generator=generator)
        ids = torch.randint(5, 40, (3, 9), generator=generator)
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[0, 6:] = False
        mask[2, 4:] = False
        out.append((images, ids, mask))
    return out


class InputRecorder:
    """The reference: record every expert linear's full input and the route's mask, reduce in numpy."""

    def __init__(self, model):
        self.inputs: dict[str, list[np.ndarray]] = {}
        self.mask = None
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("layers.") and ".shared." not in name:
                module.register_forward_hook(self.hook(f"{name}.weight"))

    def hook(self, key):
        def record(module, args, output):
            x = args[0].double().numpy()
            rows = x[self.mask.numpy()] if self.mask is not None else x.reshape(-1, x.shape[-1])
            self.inputs.setdefault(key, []).append(rows)
        return record

    def grams(self):
        return {key: np.concatenate(rows).T @ np.concatenate(rows) / sum(len(r) for r in rows) for key, rows in self.inputs.items()}


def run_reference(model, data):
    recorder = InputRecorder(model)
    with torch.no_grad():
        for images, ids, mask in data:
            recorder.mask = None
            image_bottom = model.bottom_image(images)
            recorder.mask = mask
            text_bottom = model.bottom_text(ids, mask)
            recorder.mask = None
            model.finish(image_bottom, "v")
            recorder.mask = mask
            model.finish(text_bottom, "l", mask)
            recorder.mask = torch.cat([torch.ones(3, image_bottom.shape[1], dtype=torch.bool), mask], dim=1)
            model.fuse(image_bottom, text_bottom, mask)
    return recorder.grams()


@pytest.mark.parametrize("arch", ["specific", "custom_attn"])
def test_grams_match_reference_and_cover_every_expert_linear(arch):
    model = random_model(arch).eval()
    for param in model.parameters():
        param.data.mul_(0.05)  # keep activations finite through the layers
    grams, counts = collect_grams(model, batches())
    reference = run_reference(model, batches())
    expert_linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.") and ".shared." not in name}
    assert set(grams) == set(reference) == expert_linears
    for key, gram in grams.items():
        assert gram.dtype == torch.float64
        np.testing.assert_allclose(gram.numpy(), reference[key], rtol=1e-9, atol=1e-12)
    # Token counts: images 1+16 tokens x 3 x 2 batches; captions 6+9+4 real tokens x 2.
    assert counts["layers.0.attn.v.qkv.weight"] == 17 * 3 * 2
    assert counts["layers.0.attn.l.qkv.weight"] == 19 * 2
    if arch == "specific":
        assert counts["layers.3.ffn.vl.fc1.weight"] == (17 * 3 + 19) * 2


def test_padding_does_not_change_grams():
    model = random_model("specific").eval()
    for param in model.parameters():
        param.data.mul_(0.05)
    data = batches()
    changed = [(images, torch.where(mask, ids, torch.full_like(ids, 7)), mask) for images, ids, mask in data]
    first, _ = collect_grams(model, data)
    second, _ = collect_grams(model, changed)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-6, atol=1e-9)


def test_hooks_are_removed_and_routes_leave_no_mask_behind():
    model = random_model("specific").eval()
    collect_grams(model, batches(count=1))
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_agnostic_model_has_nothing_to_collect():
    with pytest.raises(ValueError, match="no modality experts"):
        collect_grams(random_model("agnostic").eval(), batches(count=1))

