"""Objectives and retrieval metrics against hand computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vlcluster.tasks.retrieval import recall_at_k, retrieval_scores
from vlcluster.train import losses
from vlcluster.jobspec.models import TrainSpec
from vlcluster.train.optim import lr_factor


def test_itc_single_process_matches_symmetric_cross_entropy():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(6, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    loss, similarity = losses.itc_loss(image, text, scale, [6])
    logits = scale * image @ text.t()
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    assert torch.allclose(loss, expected)
    assert torch.allclose(similarity, image @ text.t())


def test_itc_is_low_for_aligned_pairs():
    features = F.normalize(torch.eye(4), dim=-1)
    loss, _ = losses.itc_loss(features, features, torch.tensor(100.0), [4])
    assert loss.item() < 1e-3


def test_hard_negatives_never_pick_the_true_pair():
    similarity = torch.randn(5, 5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        negative_text, negative_image = losses.sample_hard_negatives(similarity, generator)
        assert (negative_text != torch.arange(5)).all()
        assert (negative_image != torch.arange(5)).all()


def test_hard_negatives_prefer_similar_items():
    similarity = torch.full((3, 3), -5.0)
    similarity[0, 2] = 5.0  # caption 2 looks like image 0
    generator = torch.Generator().manual_seed(0)
    picks = [losses.sample_hard_negatives(similarity, generator)[0][0].item() for _ in range(200)]
    assert picks.count(2) > 190


def test_mask_tokens_respects_specials_padding_and_rate():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (64, 20))
    ids[:, 0] = 2  # [CLS]
    ids[:, 15] = 3  # [SEP]
    ids[:, 16:] = 0  # padding
    real = ids != 0
    special = torch.tensor([0, 1, 2, 3, 4])
    masked, labels = losses.mask_tokens(ids, real, special, mask_id=4, vocab_size=40, prob=0.15, generator=generator)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 15:].any()
    assert chosen.any(dim=1).all()  # every row trains on something
    assert torch.equal(labels[chosen], ids[chosen])
    assert 0.12 < chosen.float().sum().item() / (64 * 14) < 0.2
    assert (masked[chosen] == 4).float().mean() > 0.7
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_vqa_losses_prefer_the_right_answer():
    answers = torch.tensor([1, 0])
    right = torch.tensor([[-5.0, 5.0, -5.0], [5.0, -5.0, -5.0]])
    for kind in ("softmax", "bce"):
        assert losses.vqa_loss(right, answers, kind) < losses.vqa_loss(-right, answers, kind)
    assert torch.isclose(losses.vqa_loss(right, answers, "softmax"), F.cross_entropy(right, answers))
    bce = F.binary_cross_entropy_with_logits(right, F.one_hot(answers, 3).float()) * 3
    assert torch.isclose(losses.vqa_loss(right, answers, "bce"), bce)


def test_recall_at_k_by_hand():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.1, 0.2]])
    # row 0 ranks its item 1st, row 1 2nd, row 2 1st
    recalls = recall_at_k(similarity, (1, 2))
    assert math.isclose(recalls[1], 2 / 3, rel_tol=1e-6) and recalls[2] == 1.0


def test_retrieval_scores_perfect_and_mean_of_recalls():
    embeddings = F.normalize(torch.eye(12), dim=-1)
    scores = retrieval_scores(embeddings, embeddings)
    assert scores["tr"] == scores["ir"] == 100.0
    shuffled = retrieval_scores(embeddings, embeddings.roll(1, dims=0))
    assert math.isclose(shuffled["tr"], (shuffled["tr_r1"] + shuffled["tr_r5"] + shuffled["tr_r10"]) / 3)


def test_rank_batch_sizes_split_a_global_batch_exactly():
    sizes = TrainSpec(steps=1, batch_size=1024).rank_batch_sizes(48)
    assert sum(sizes) == 1024 and set(sizes) == {21, 22}


def test_lr_warms_up_then_decays_to_zero():
    assert lr_factor(0, 10, 100) == 0.1
    assert lr_factor(9, 10, 100) == 1.0
    assert lr_factor(55, 10, 100) == 0.5
    assert lr_factor(100, 10, 100) == 0.0
