"""RegMean statistics: hooks see every expert's linear inputs, padding is
masked, Grams are normalised by token count and accumulated in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.support.merge_fixtures import random_model
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


@pytest.mark.parametrize(("arch", "position"), [("specific", "absolute"), ("custom_attn", "absolute"), ("specific", "relative")])
def test_grams_match_reference_and_cover_every_expert_linear(arch, position):
    model = random_model(arch, position=position).eval()
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


@pytest.mark.parametrize("position", ["absolute", "relative"])
def test_padding_does_not_change_grams(position):
    model = random_model("specific", position=position).eval()
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



WORDS = ["red", "blue", "square", "circle", "left", "right", "top", "a", "the", "of"]


def _samples(count: int = 14) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    samples = []
    for index in range(count):
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (2 + index % 5,), generator=generator)]
        samples.append({"image": torch.randn(3, 32, 32, generator=generator), "caption": " ".join(words)})
    return samples


def _rank_grams(rank: int, world: int, tokenizer: str, init_file: str, out: str) -> None:
    """One process of a gloo group: this rank's share of the batches, Grams all-reduced."""
    import torch.distributed as dist

    from vlcluster.data.tokenizer import TextEncoder
    from vlcluster.merge.grams import rank_batches

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = random_model("specific").eval()
        for param in model.parameters():
            param.data.mul_(0.05)
        data = rank_batches(_samples(), TextEncoder(tokenizer), 12, batches=3, batch_size=4, rank=rank, world=world)
        grams, counts = collect_grams(model, data)
        if rank == 0:
            torch.save({"grams": grams, "counts": counts}, out)
    except BaseException:
        dist.destroy_process_group()
        raise
    from vlcluster.train.dist import exit_process

    exit_process(0)  # as a stage's rank ends: gloo may abort in its destructors at interpreter exit


def test_two_ranks_give_the_grams_of_one(tmp_path):
    """Distributed collection splits every batch across ranks and all-reduces sums
    and token counts: the result is the single-process one, up to float32 rounding
    of the forward pass over differently composed batches."""
    import torch.multiprocessing as mp

    from vlcluster.data.tokenizer import TextEncoder, build_word_tokenizer
    from vlcluster.merge.grams import rank_batches

    tokenizer = tmp_path / "tokenizer.json"
    build_word_tokenizer(WORDS).save(str(tokenizer))
    out = tmp_path / "two_ranks.pt"
    mp.spawn(_rank_grams, args=(2, str(tokenizer), str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)

    model = random_model("specific").eval()
    for param in model.parameters():
        param.data.mul_(0.05)
    single, counts = collect_grams(model, rank_batches(_samples(), TextEncoder(tokenizer), 12, batches=3, batch_size=4, rank=0, world=1))
    assert distributed["counts"] == counts
    assert counts["layers.0.attn.v.qkv.weight"] == 12 * 17  # 3 batches x 4 images x (1 + 16) tokens: 12 of 14 samples
    assert set(distributed["grams"]) == set(single)
    for key, gram in single.items():
        torch.testing.assert_close(distributed["grams"][key], gram, rtol=1e-4, atol=1e-8)
