"""Model FLOPs per sample: a hand count for a 1-layer model of every route,
agreement with torch's FlopCounterMode on a real forward, the peak table,
and the throughput meter's rates."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlcluster.jobspec.models import LossWeights
from vlcluster.model import ModelConfig, MultiwayTransformer, preset
from vlcluster.train import losses
from vlcluster.train.batches import Batch
from vlcluster.train.device_peaks import peak_tflops
from vlcluster.train.model_flops import Objectives, StepShape, forward_breakdown, train_flops_per_sample
from vlcluster.train.objective import Objective
from vlcluster.train.throughput_meter import ThroughputMeter, expected_masked_tokens

# One layer (N = M = 1: every route runs through layer 0), d = 8, MLP 32,
# 8px images in 4px patches (4 patches + [CLS] = 5 image tokens).
ONE_LAYER = ModelConfig(
    arch="specific", dim=8, depth=1, heads=2, vl_layers=1, image_size=8, patch_size=4,
    vocab_size=10, max_text_len=8, num_answers=3, itc_dim=4,
)
SHAPE = StepShape(text_len=6, rank_batch=4, global_batch=12, masked_tokens=1.5, question_len=3)


def hand_layer(L: int) -> int:
    """One block over L tokens, every matmul as 2*m*n*k."""
    qkv = 2 * L * 24 * 8  # [L, 8] x [8, 24]
    proj = 2 * L * 8 * 8  # [L, 8] x [8, 8]
    scores = 2 * L * L * 8  # Q K^T: [L, 8] x [8, L] summed over the 2 heads of 4 dims
    weighted = 2 * L * 8 * L  # A V: [L, L] x [L, 8]
    fc1 = 2 * L * 32 * 8  # [L, 8] x [8, 32]
    fc2 = 2 * L * 8 * 32  # [L, 32] x [32, 8]
    return qkv + proj + scores + weighted + fc1 + fc2


EMBEDDING = 2 * 4 * 8 * 48  # 4 patches x [3*4*4 = 48 inputs] x 8 outputs
ITC = (
    hand_layer(5) + hand_layer(6)  # image and caption through layer 0 (no bottom layers: B = 0)
    + 2 * (2 * 1 * 4 * 8)  # image and text projections 8 -> 4
    + 2 * (2 * 1 * 12 * 4)  # i2t and t2i logits against the 12 samples of the global batch (ITM mines from them too)
)
ITM = 3 * (hand_layer(11) + 2 * 8 * 8 + 2 * 2 * 8)  # positive + 2 hard negatives: fusion at 5+6 tokens, pooler, classifier
MLM = hand_layer(11) + 1.5 * (2 * 8 * 8 + 2 * 10 * 8)  # fusion of the masked caption, head on 1.5 masked tokens
VQA = hand_layer(8) + 2 * 16 * 8 + 2 * 3 * 16  # fusion with the 3-token question, fc1 8->16, fc2 16->3


@pytest.mark.parametrize(
    "objectives, expected",
    [
        (Objectives(itc=True, itm=False, mlm=False, vqa=False), {"itc": ITC}),
        (Objectives(itc=True, itm=True, mlm=False, vqa=False), {"itc": ITC, "itm": ITM}),
        (Objectives(itc=False, itm=False, mlm=True, vqa=False), {"mlm": MLM}),
        (Objectives(itc=False, itm=False, mlm=False, vqa=True), {"vqa": VQA}),
        (Objectives(itc=True, itm=True, mlm=True, vqa=True), {"itc": ITC, "itm": ITM, "mlm": MLM, "vqa": VQA}),
    ],
)
def test_one_layer_model_matches_the_hand_count_of_each_route(objectives, expected):
    counted = forward_breakdown(ONE_LAYER, objectives, SHAPE)
    assert counted == {"image_embedding": EMBEDDING, "image_bottom": 0, **expected}
    assert train_flops_per_sample(ONE_LAYER, objectives, SHAPE) == 3 * (EMBEDDING + sum(expected.values()))


def test_bottom_layers_are_shared_by_itc_and_itm_but_not_by_mlm():
    config = preset("tiny", "specific", depth=3, vl_layers=1)  # B = 2 bottom layers
    shape = StepShape(text_len=10, rank_batch=8, global_batch=8)
    itc_itm = forward_breakdown(config, Objectives(True, True, False, False), shape)
    with_mlm = forward_breakdown(config, Objectives(True, True, True, False), shape)
    # MLM adds its own masked-caption bottom pass and one fusion pass; the image bottom stays once.
    assert with_mlm["image_bottom"] == itc_itm["image_bottom"]
    image_tokens, text = config.num_patches + 1, 10
    from vlcluster.train.model_flops import layer_forward

    assert with_mlm["mlm"] == 2 * layer_forward(config, text) + layer_forward(config, image_tokens + text)


WEIGHTS = [
    LossWeights(itc=1, itm=0, mlm=0),
    LossWeights(itc=1, itm=1, mlm=0),
    LossWeights(itc=0, itm=0, mlm=1),
    LossWeights(itc=0, itm=0, mlm=0, vqa=1),
    LossWeights(itc=1, itm=1, mlm=0.25, vqa=1),
]


@pytest.mark.parametrize("weights", WEIGHTS, ids=lambda w: "+".join(n for n in ("itc", "itm", "mlm", "vqa") if getattr(w, n)))
def test_count_agrees_with_flop_counter_mode_on_a_real_forward(weights):
    config = preset("tiny", "specific", depth=3, vl_layers=1, num_answers=5)
    torch.manual_seed(0)
    special = [0, 1, 2, 3, 4]
    B, L = 4, 9
    objective = Objective(MultiwayTransformer(config), weights, special, 4, 0.15, [B])
    ids = torch.randint(5, config.vocab_size, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 6:] = False
    batch = Batch(torch.randn(B, 3, 32, 32), ids, mask, ids[:, :5], mask[:, :5], torch.arange(B))
    # The math kernel runs attention as bmm, which the counter sees (the CPU's fused kernel it does not count).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        objective(batch, torch.Generator().manual_seed(0))
    # The masked positions the objective drew: replay its generator.
    replay = torch.Generator().manual_seed(0)
    if weights.itm > 0:
        losses.sample_hard_negatives(losses.ContrastiveLogits(torch.zeros(B, B), torch.zeros(B, B), 0), replay)
    _, labels = losses.mask_tokens(ids, mask, torch.tensor(special), 4, config.vocab_size, 0.15, replay)
    shape = StepShape(text_len=L, rank_batch=B, global_batch=B, masked_tokens=(labels != -100).sum().item() / B, question_len=5)
    expected = sum(forward_breakdown(config, Objectives.from_weights(weights), shape).values()) * B
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_base_model_forward_is_in_vit_b_range():
    """Sanity of scale: the image bottom + top of ViT-B/16 at 224px is ~35 GFLOPs (17.5 GMACs)."""
    config = preset("base", "agnostic")
    shape = StepShape(text_len=40, rank_batch=128, global_batch=128, masked_tokens=6)
    parts = forward_breakdown(config, Objectives(True, True, True, False), shape)
    image_encoder = parts["image_embedding"] + parts["image_bottom"] + 2 * 2 * 197 * 768 * (12 * 768)  # + top 2 layers approx
    assert 33e9 < image_encoder < 37e9


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("Tesla V100-SXM2-32GB", "fp16", 125.0),
        ("Tesla V100-SXM2-32GB", "fp32", 15.7),
        ("Tesla V100-SXM2-32GB", "bf16", None),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA L40S", "fp16", 362.0),
        ("NVIDIA A10G", "bf16", None),  # not published: no MFU rather than a guess
        ("cpu", "fp32", None),
        ("v100", "fp16", 112.0),  # a profile's gpu_type, any case: the PCIe peak without the SXM2 in the name
    ],
)
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_meter_rates_on_cpu_have_flops_but_no_mfu():
    config = preset("tiny", "agnostic")
    meter = ThroughputMeter(config, Objectives(True, True, True, False), "fp32", torch.device("cpu"), world_size=1)
    shape = StepShape(text_len=12, rank_batch=8, global_batch=8, masked_tokens=1.5)
    meter.record(shape, 8)
    meter.record(shape, 8)
    scalars = meter.window()
    assert meter.total["flops"] == 16 * train_flops_per_sample(config, Objectives(True, True, True, False), shape)
    assert meter.total["tokens"] == 16 * (17 + 12)
    assert scalars["throughput/tflops"] == pytest.approx(meter.total["flops"] / meter.total["seconds"] / 1e12)
    assert "throughput/mfu" not in scalars and "memory/peak_gb" not in scalars
    assert meter.window()["throughput/tflops"] == 0.0  # counts restart every window
    summary = meter.summary()  # result.json: what `plan` matches a measured MFU by
    assert (summary["device"], summary["precision"], summary["mfu"]) == ("cpu", "fp32", None)


def test_expected_masked_tokens_counts_maskable_tokens_and_at_least_one():
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :12] = True  # 10 maskable
    mask[1, :3] = True  # 1 maskable -> 0.15, forced to 1
    assert expected_masked_tokens(mask, 0.15) == pytest.approx((1.5 + 1.0) / 2)
