"""A merged checkpoint of every architecture loads strictly into the agnostic
model and the eval stage's evaluation runs on it (synthetic data)."""

from __future__ import annotations

import pytest
import torch

from vlcluster.data.tokenizer import TextEncoder
from vlcluster.merge.apply import merge_state
from vlcluster.model import MultiwayTransformer, preset
from vlcluster.tasks.evaluate import evaluate, load_model


@pytest.fixture(scope="module")
def val_data(synthetic_data):
    return synthetic_data.clean(16, 24, 16, 32, 0).dir


@pytest.mark.parametrize(("arch", "position"), [("specific", "absolute"), ("custom_attn", "absolute"),
                                              ("custom_ffn", "absolute"), ("custom_ln", "absolute"),
                                              ("specific", "relative"), ("custom_ffn", "both")])
def test_merged_checkpoint_of_every_arch_evaluates(val_data, arch, position):
    torch.manual_seed(0)
    encoder = TextEncoder(val_data / "tokenizer.json")
    config = preset("tiny", arch, vocab_size=encoder.vocab_size, num_answers=0, position=position)
    state = MultiwayTransformer(config, heads=("itc",)).state_dict()
    merged = merge_state(state, "interpolation", alpha=0.75)
    model = load_model(merged, config.with_arch("agnostic"))  # strict: no missing or unexpected keys
    result = evaluate(model, encoder, [], sorted(str(p) for p in val_data.glob("val-*.tar")), ["retrieval"], 8)
    assert result["retrieval_pairs"] == 24 and 0 <= result["tr"] <= 100
    # One item per image for the study report's bootstrap; they average to the mean of TR and IR
    # when every image has as many captions.
    items = result["items"]
    assert len(items["retrieval"]) == len(items["tr"]) == 24 and len(items["ir"]) == result["retrieval_captions"]
    assert sum(items["tr"]) / 24 == pytest.approx(result["tr"], abs=1e-3)
    if result["retrieval_captions"] % 24 == 0:
        assert sum(items["retrieval"]) / 24 == pytest.approx((result["tr"] + result["ir"]) / 2, abs=1e-3)
