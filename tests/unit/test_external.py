"""External checkpoints: BEiT as `transformers` writes it, the authors' VLMo layout,
and the vlcluster -> VLMo -> vlcluster round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.support.beit import DEPTH, DIM, HEADS, IMAGE, PATCH, saved_beit
from vlcluster.cli import main
from vlcluster.model import ModelConfig, MultiwayTransformer, load_into, preset
from vlcluster.model.external import (
    CheckpointError, config_for, convert, convert_to_model_dir, export_vlmo, fit, init_from_checkpoint,
)
from vlcluster.model.files import write_model
from vlcluster.stages.rundir import StageDir

transformers = pytest.importorskip("transformers")


def small(arch: str, **kw):
    return preset("tiny", arch, **{**dict(dim=DIM, depth=DEPTH, heads=HEADS, patch_size=PATCH, image_size=IMAGE), **kw})


@pytest.fixture(scope="module")
def beit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("beit")
    return path, saved_beit(path)


@pytest.mark.parametrize(("arch", "layer_scale"), [("specific", 0.1), ("agnostic", 0.0)])
def test_beit_from_transformers_matches_beit_on_the_vision_route(beit_dir, arch, layer_scale):
    path, beit = beit_dir
    assert "encoder.layer.0.attention.attention.key.weight" in load_file(str(path / "model.safetensors"))
    torch.manual_seed(1)
    model = MultiwayTransformer(small(arch, layer_scale=layer_scale), heads=("itc", "itm")).eval()
    report = init_from_checkpoint(model, str(path), "beit")

    assert set(report.fresh) == {
        key for key in model.state_dict() if key.startswith(("embed.text.", "embed.token_type.", "heads."))
    }
    assert report.dropped == {}
    if not layer_scale:
        assert any("folded" in note for note in report.notes)
    with torch.no_grad():
        model.embed["token_type"].weight.zero_()  # BEiT has no token types; fresh ones would shift every token
        images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
        expected = beit(pixel_values=images)
        ours = model.encode_image(images)
    torch.testing.assert_close(ours, expected.last_hidden_state, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours[:, 0], expected.pooler_output, atol=2e-5, rtol=1e-4)
    if arch == "specific":  # every expert starts as BEiT's weight, like the seed -> VL copy
        layer = model.layers[DEPTH - 1].ffn
        assert torch.equal(layer["v"].fc1.weight, layer["l"].fc1.weight)
        assert torch.equal(layer["v"].fc1.weight, layer["vl"].fc1.weight)


def randomised(model):
    """Random weights everywhere, relative bias tables included (BEiT starts them at zero)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(0, 1.0)
    return model


BEIT_VARIANTS = {
    # name: (BeitConfig changes, vlcluster position, relative_bias)
    "per_layer_mean_pooling": (dict(use_relative_position_bias=True, use_absolute_position_embeddings=False, use_mean_pooling=True), "relative", "per_layer"),
    "shared": (dict(use_shared_relative_position_bias=True, use_absolute_position_embeddings=False), "relative", "shared"),
    "shared_and_absolute": (dict(use_shared_relative_position_bias=True, use_mean_pooling=True), "both", "shared"),
    "per_layer_and_shared": (dict(use_relative_position_bias=True, use_shared_relative_position_bias=True, use_absolute_position_embeddings=False), "relative", "per_layer"),
}


def beit_tokens(beit, images):
    """BEiT's token features: last hidden states after its final norm (a mean-pooling BEiT has
    none on the sequence; its pooler's norm is the one vlcluster takes as the final norm)."""
    hidden = beit(pixel_values=images).last_hidden_state
    return beit.pooler.layernorm(hidden) if beit.config.use_mean_pooling else hidden


@pytest.mark.parametrize("variant", sorted(BEIT_VARIANTS))
def test_beit_with_relative_bias_is_the_same_function(tmp_path, variant):
    changes, position, relative_bias = BEIT_VARIANTS[variant]
    torch.manual_seed(0)
    beit = randomised(saved_beit(tmp_path, **changes))
    beit.save_pretrained(tmp_path)
    converted = convert(tmp_path, "beit")
    assert (converted.structure["position"], converted.structure["relative_bias"]) == (position, relative_bias)
    model = MultiwayTransformer(small("specific", layer_scale=0.1, position=position, relative_bias=relative_bias), heads=())
    state, fresh = fit(converted, model)
    load_into(model, state, allow_missing_prefixes=tuple(fresh))
    assert "position_bias.image" not in fresh and {"position_bias.text", "position_bias.cross"} <= set(fresh)
    assert not any("relative_position_bias_table" in key for key in converted.report.dropped)
    with torch.no_grad():
        model.embed["token_type"].weight.zero_()  # BEiT has no token types
        images = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
        expected, ours = beit_tokens(beit.eval(), images), model.eval().encode_image(images)
    assert (ours - expected).abs().max() < 1e-5, (ours - expected).abs().max()
    assert expected.abs().mean() > 0.1  # a real signal, not zeros
    # Without the bias the function is another one: the tables matter.
    with torch.no_grad():
        model.position_bias.image.zero_()
        assert (model.encode_image(images) - expected).abs().max() > 1e-2


def test_a_checkpoint_of_another_resolution_loads_with_resized_position_tables(tmp_path):
    saved_beit(tmp_path, use_relative_position_bias=True)  # absolute table and relative bias, 32 px
    model = MultiwayTransformer(small("agnostic", layer_scale=0.1, position="both", image_size=48), heads=())
    report = init_from_checkpoint(model, str(tmp_path), "beit")
    assert any("resized from 32 px to 48 px" in note for note in report.notes)
    assert model.embed["image"].pos.shape == (1, 1 + 6 * 6, DIM)
    assert model.position_bias.image.shape == ((2 * 6 - 1) ** 2 + 3, HEADS * DEPTH)
    source = load_file(str(tmp_path / "model.safetensors"))
    table = source["encoder.layer.1.attention.attention.relative_position_bias.relative_position_bias_table"]
    assert torch.equal(model.position_bias.image[-3:, HEADS:], table[-3:])  # [CLS] rows kept
    assert torch.isfinite(model.encode_image(torch.randn(1, 3, 48, 48))).all()


def test_shared_beit_bias_is_copied_to_every_layer_of_a_per_layer_model(tmp_path):
    beit = randomised(saved_beit(tmp_path, use_shared_relative_position_bias=True, use_absolute_position_embeddings=False))
    beit.save_pretrained(tmp_path)
    model = MultiwayTransformer(small("agnostic", layer_scale=0.1, position="relative"), heads=())
    report = init_from_checkpoint(model, str(tmp_path), "beit")
    assert any("copied to every layer" in note for note in report.notes)
    with torch.no_grad():
        model.embed["token_type"].weight.zero_()
        images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(model.eval().encode_image(images), beit_tokens(beit.eval(), images), atol=1e-5, rtol=0)
    absolute = MultiwayTransformer(small("agnostic", layer_scale=0.1), heads=())
    with pytest.raises(CheckpointError, match="model.position: the checkpoint has relative, the model absolute"):
        init_from_checkpoint(absolute, str(tmp_path), "beit")


def test_vit_from_transformers_is_the_same_function(tmp_path):
    """The paper's Table 4 backbone: a supervised ViT as `transformers` writes it, vit_tiny's
    width and heads at a small depth and resolution."""
    config = transformers.ViTConfig(hidden_size=192, num_attention_heads=3, intermediate_size=768, num_hidden_layers=2,
                                    image_size=IMAGE, patch_size=PATCH)
    torch.manual_seed(0)
    vit = transformers.ViTModel(config).eval()
    with torch.no_grad():
        for param in vit.parameters():
            param.normal_(0, 0.1) if param.ndim > 1 else param.uniform_(0.5, 1.5)
    vit.save_pretrained(tmp_path)
    assert "encoder.layer.0.attention.attention.key.bias" in load_file(str(tmp_path / "model.safetensors"))
    assert main(["convert", "--from", "vit", str(tmp_path), "-o", str(tmp_path / "model"), "--size", "vit_tiny"]) == 0
    report = json.loads((tmp_path / "model" / "model.json").read_text())["provenance"]["conversion"]
    assert set(report["dropped"]) == {"pooler.dense.weight", "pooler.dense.bias"}  # ViT's tanh pooler
    record = json.loads((tmp_path / "model" / "model.json").read_text())["config"]
    assert (record["dim"], record["heads"], record["depth"], record["position"], record["layer_scale"]) == (192, 3, 2, "absolute", 0.0)
    assert record["layer_norm_eps"] == config.layer_norm_eps
    model = MultiwayTransformer(ModelConfig.from_dict(record), heads=())
    load_into(model, {k: v for k, v in load_file(str(tmp_path / "model" / "model.safetensors")).items() if not k.startswith("heads.")},
              allow_missing_prefixes=())
    with torch.no_grad():
        model.embed["token_type"].weight.zero_()
        images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
        expected, ours = vit(pixel_values=images).last_hidden_state, model.eval().encode_image(images)
    assert (ours - expected).abs().max() < 1e-5 and expected.abs().mean() > 0.1


def test_beit_that_does_not_fit_the_model_names_the_fields(beit_dir):
    path, _ = beit_dir
    model = MultiwayTransformer(preset("tiny", "agnostic"), heads=())
    with pytest.raises(CheckpointError, match=r"model\.dim: the checkpoint has 64, the model 128"):
        init_from_checkpoint(model, str(path), "beit")


# --- the authors' VLMo / vl-merging layout ----------------------------------------------


def authors_state(depth=4, vl_from=3, dim=DIM, vocab=50, text_len=12, generator=None):
    """A random state dict in the authors' layout, keys spelled out as their code names them."""
    g = generator or torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = {
        "transformer.cls_token": r(1, 1, dim),
        "transformer.pos_embed": r(1, (IMAGE // PATCH) ** 2 + 1, dim),
        "transformer.patch_embed.proj.weight": r(dim, 3, PATCH, PATCH),
        "transformer.patch_embed.proj.bias": r(dim),
        "transformer.norm.weight": r(dim),
        "transformer.norm.bias": r(dim),
        "transformer.mask_token": r(1, 1, dim),
        "text_embeddings.word_embeddings.weight": r(vocab, dim),
        "text_embeddings.position_embeddings.weight": r(text_len, dim),
        "text_embeddings.token_type_embeddings.weight": r(2, dim),
        "text_embeddings.LayerNorm.weight": r(dim),
        "text_embeddings.LayerNorm.bias": r(dim),
        "token_type_embeddings.weight": r(2, dim),
    }
    for i in range(depth):
        block = f"transformer.blocks.{i}"
        state[f"{block}.gamma_1"], state[f"{block}.gamma_2"] = r(dim), r(dim)
        for m in ("v", "l", "vl") if i >= vl_from else ("v", "l"):
            state[f"{block}.attn.{m}.qkv.weight"] = r(3 * dim, dim)
            state[f"{block}.attn.{m}.q_bias"], state[f"{block}.attn.{m}.v_bias"] = r(dim), r(dim)
            state[f"{block}.attn.{m}.proj.weight"], state[f"{block}.attn.{m}.proj.bias"] = r(dim, dim), r(dim)
            for norm in ("norm1", "norm2"):
                state[f"{block}.{norm}.{m}.weight"], state[f"{block}.{norm}.{m}.bias"] = r(dim), r(dim)
            state[f"{block}.mlp.{m}.fc1.weight"], state[f"{block}.mlp.{m}.fc1.bias"] = r(4 * dim, dim), r(4 * dim)
            state[f"{block}.mlp.{m}.fc2.weight"], state[f"{block}.mlp.{m}.fc2.bias"] = r(dim, 4 * dim), r(dim)
    state["pooler.dense.weight"], state["pooler.dense.bias"] = r(dim, dim), r(dim)
    state["itm_score.fc.weight"], state["itm_score.fc.bias"] = r(2, dim), r(2)
    return state


def test_vlmo_layout_converts_and_loads_strictly(tmp_path):
    source = authors_state()
    torch.save({"state_dict": source, "epoch": 3}, tmp_path / "vlmo.ckpt")  # a Lightning checkpoint, as theirs are
    converted = convert(tmp_path / "vlmo.ckpt", "vlmo")
    assert (converted.structure["arch"], converted.structure["vl_layers"], converted.structure["depth"]) == ("specific", 1, 4)
    model = MultiwayTransformer(small("specific", depth=4, vl_layers=1, layer_scale=0.1, vocab_size=50, max_text_len=12), heads=("itc", "itm"))
    state, fresh = fit(converted, model)
    load_into(model, state, allow_missing_prefixes=tuple(fresh))
    assert set(fresh) == {key for key in model.state_dict() if key.startswith("heads.itc.")}  # itm came with the checkpoint

    attn = model.layers[3].attn["vl"]
    assert torch.equal(attn.qkv.weight, source["transformer.blocks.3.attn.vl.qkv.weight"])
    q, k, v = attn.qkv.bias.chunk(3)
    assert torch.equal(q, source["transformer.blocks.3.attn.vl.q_bias"]) and not k.any()
    assert torch.equal(v, source["transformer.blocks.3.attn.vl.v_bias"])
    assert torch.equal(model.layers[0].ln2["l"].weight, source["transformer.blocks.0.norm2.l.weight"])
    assert torch.equal(model.layers[1].gamma_ffn, source["transformer.blocks.1.gamma_2"])
    assert torch.equal(model.embed["text"].pos[0], source["text_embeddings.position_embeddings.weight"])
    assert torch.equal(model.heads["itm"].pool.weight, source["pooler.dense.weight"])
    dropped = converted.report.summary()["dropped"]
    assert set(dropped) == {
        "transformer.mask_token", "text_embeddings.LayerNorm.weight", "text_embeddings.LayerNorm.bias",
        "text_embeddings.token_type_embeddings.weight",
    }


# --- the authors' layout with relative position bias: a reference forward from VLMo's equations ---

GRID, T0 = IMAGE // PATCH, 20  # T0: the text distances their table was written for (max_text_len_of_initckpt)


def relative_authors_state(depth=4, vl_from=3, text_len=12):
    """VLMo-base's kind of model in the authors' layout: no absolute image table, one relative
    bias table (heads x layers columns), BERT text embedding with its LayerNorm; random weights."""
    g = torch.Generator().manual_seed(5)
    state = {}
    for key, tensor in authors_state(depth=depth, vl_from=vl_from, text_len=text_len, generator=g).items():
        if key == "transformer.pos_embed":
            continue
        state[key] = torch.randn(tensor.shape, generator=g) * 0.1 if tensor.ndim > 1 else torch.rand(tensor.shape, generator=g) + 0.5
    rows = (2 * GRID - 1) ** 2 + 3 + 2 + 2 * T0
    state["relative_position_bias_table"] = torch.randn(rows, HEADS * depth, generator=g)
    return state


def vlmo_indices(text_len):
    """Row indices of VLMo's table: image (query - key in 2-D), text (key - query in 1-D), both with
    [CLS] rows, and the fused [text; image] sequence with the two cross rows."""
    n_img, side = (2 * GRID - 1) ** 2 + 3, 2 * GRID - 1
    total = n_img + 2 * T0 + 2
    ys, xs = torch.arange(GRID).repeat_interleave(GRID), torch.arange(GRID).repeat(GRID)
    image = torch.zeros(GRID**2 + 1, GRID**2 + 1, dtype=torch.long)
    image[1:, 1:] = (ys[:, None] - ys[None, :] + GRID - 1) * side + (xs[:, None] - xs[None, :] + GRID - 1)
    image[0, :], image[:, 0], image[0, 0] = n_img - 3, n_img - 2, n_img - 1
    text = torch.zeros(text_len, text_len, dtype=torch.long)
    positions = torch.arange(text_len - 1)
    text[1:, 1:] = positions[None, :] - positions[:, None] - (2 - T0) + n_img + 2
    text[0, :], text[:, 0], text[0, 0] = total - 3, total - 2, total - 1
    fused = torch.cat([
        torch.cat([text, torch.full((text_len, GRID**2 + 1), n_img)], dim=1),
        torch.cat([torch.full((GRID**2 + 1, text_len), n_img + 1), image], dim=1),
    ])
    return image, text, fused


def vlmo_reference(state, images, ids, mask, depth=4, vl_from=3):
    """VLMo's forward written from its equations (their text-first fused order); fusion below
    ``vl_from`` keeps image and text apart, as vl-merging's modality-specific model does."""
    table = state["relative_position_bias_table"]
    image_index, text_index, fused_index = vlmo_indices(ids.shape[1])

    def biases(index):
        return table[index].permute(2, 0, 1).chunk(depth, dim=0)

    def block(x, i, expert, bias, key_mask):
        b = f"transformer.blocks.{i}"
        B, n, d = x.shape
        h = F.layer_norm(x, (d,), state[f"{b}.norm1.{expert}.weight"], state[f"{b}.norm1.{expert}.bias"], 1e-6)
        qkv_bias = torch.cat([state[f"{b}.attn.{expert}.q_bias"], torch.zeros(d), state[f"{b}.attn.{expert}.v_bias"]])
        q, k, v = F.linear(h, state[f"{b}.attn.{expert}.qkv.weight"], qkv_bias).reshape(B, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        scores = (q * (d // HEADS) ** -0.5) @ k.transpose(-2, -1) + bias[None]
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, n, d)
        x = x + state[f"{b}.gamma_1"] * F.linear(out, state[f"{b}.attn.{expert}.proj.weight"], state[f"{b}.attn.{expert}.proj.bias"])
        h = F.layer_norm(x, (d,), state[f"{b}.norm2.{expert}.weight"], state[f"{b}.norm2.{expert}.bias"], 1e-6)
        ffn = F.linear(F.gelu(F.linear(h, state[f"{b}.mlp.{expert}.fc1.weight"], state[f"{b}.mlp.{expert}.fc1.bias"])),
                       state[f"{b}.mlp.{expert}.fc2.weight"], state[f"{b}.mlp.{expert}.fc2.bias"])
        return x + state[f"{b}.gamma_2"] * ffn

    def run(x, expert, layers, bias, key_mask=None):
        for i in layers:
            x = block(x, i, expert, bias[i], key_mask)
        return x

    def norm(x):
        return F.layer_norm(x, (x.shape[-1],), state["transformer.norm.weight"], state["transformer.norm.bias"], 1e-6)

    types = state["token_type_embeddings.weight"]  # 0 = text, 1 = image
    words = state["text_embeddings.word_embeddings.weight"][ids] + state["text_embeddings.token_type_embeddings.weight"][0]
    text = F.layer_norm(words, (words.shape[-1],), state["text_embeddings.LayerNorm.weight"],
                        state["text_embeddings.LayerNorm.bias"], 1e-12) + types[0]  # relative: BERT adds no positions
    patches = F.conv2d(images, state["transformer.patch_embed.proj.weight"], state["transformer.patch_embed.proj.bias"], stride=PATCH)
    image = torch.cat([state["transformer.cls_token"].expand(len(images), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1) + types[1]
    image_bias, text_bias, fused_bias = biases(image_index), biases(text_index), biases(fused_index)
    image_bottom = run(image, "v", range(vl_from), image_bias)
    text_bottom = run(text, "l", range(vl_from), text_bias, mask)
    fused_mask = torch.cat([mask, torch.ones(len(images), GRID**2 + 1, dtype=torch.bool)], dim=1)
    return {
        "image": norm(run(image_bottom, "v", range(vl_from, depth), image_bias)),
        "text": norm(run(text_bottom, "l", range(vl_from, depth), text_bias, mask)),
        "fused": norm(run(torch.cat([text_bottom, image_bottom], dim=1), "vl", range(vl_from, depth), fused_bias, fused_mask)),
    }


@pytest.mark.parametrize("with_buffers", [False, True])
def test_vlmo_with_relative_bias_is_the_same_function(tmp_path, with_buffers):
    from vlcluster.model.formats.vlmo import index_buffers

    source = relative_authors_state()
    if with_buffers:  # vl-merging saves its index buffers: their shapes fix the grid and the text length (12)
        source.update(index_buffers(GRID, 12))
    torch.save({"state_dict": source}, tmp_path / "vlmo.ckpt")
    converted = convert(tmp_path / "vlmo.ckpt", "vlmo")
    assert (converted.structure["position"], converted.structure["heads"]) == ("relative", HEADS)
    assert any("folded into the word table" in note for note in converted.report.notes)
    fix = {} if with_buffers else {"max_text_len": 12}  # without the buffers the text length is the model's to say
    if with_buffers:
        assert (converted.structure["image_size"], converted.structure["max_text_len"]) == (IMAGE, 12)
    model = MultiwayTransformer(config_for(converted, "tiny", vocab_size=50, **fix), heads=()).eval()
    assert (model.config.position, model.config.layer_scale, model.config.vl_layers) == ("relative", 0.1, 1)
    state, fresh = fit(converted, model)
    load_into(model, state, allow_missing_prefixes=tuple(fresh))
    assert not fresh

    g = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(0, 50, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        expected = vlmo_reference(source, images, ids, mask)
        ours = {"image": model.encode_image(images), "text": model.encode_text(ids, mask), "fused": model.fusion(images, ids, mask)}
    ours["fused"] = torch.cat([ours["fused"][:, GRID**2 + 1 :], ours["fused"][:, : GRID**2 + 1]], dim=1)  # ours: image first
    for route in ("image", "text", "fused"):
        assert (ours[route] - expected[route]).abs().max() < 1e-5, (route, (ours[route] - expected[route]).abs().max())
        assert expected[route].abs().mean() > 0.1
    with torch.no_grad():  # the image<->text rows are read where VLMo reads them: without them the fused route differs
        model.position_bias.cross.copy_(model.position_bias.cross.flip(0))
        assert (model.fusion(images, ids, mask) - ours["fused"].roll(GRID**2 + 1, dims=1)).abs().max() > 1e-3


def test_convert_from_vlmo_takes_the_text_length_the_checkpoint_does_not_fix(tmp_path):
    """The documented `convert --from vlmo CKPT -o OUT --max-text-len N`: a unilm VLMo without
    vl-merging's index buffers; the written model computes VLMo's routes (the reference above)."""
    import vlcluster

    source = relative_authors_state()
    torch.save({"state_dict": source}, tmp_path / "vlmo.ckpt")
    out = tmp_path / "vlmo"
    assert main(["convert", "--from", "vlmo", str(tmp_path / "vlmo.ckpt"), "-o", str(out), "--max-text-len", "12",
                 "--image-size", str(IMAGE)]) == 0
    model = vlcluster.load_model(out)
    assert (model.config.position, model.config.max_text_len, model.config.heads) == ("relative", 12, HEADS)
    g = torch.Generator().manual_seed(7)
    images, ids = torch.randn(2, 3, IMAGE, IMAGE, generator=g), torch.randint(0, 50, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        expected = vlmo_reference(source, images, ids, mask)
        assert (model.encode_image(images) - expected["image"]).abs().max() < 1e-5
        assert (model.encode_text(ids, mask) - expected["text"]).abs().max() < 1e-5


def test_original_vlmo_ffn_expert_names_are_read(tmp_path):
    source = {}
    for key, tensor in authors_state(depth=2, vl_from=2).items():
        key = key.replace(".attn.v.", ".attn.").replace(".norm1.v.", ".norm1.")  # VLMo shares attention and norm1
        if ".attn.l." in key or ".norm1.l." in key:
            continue
        key = key.replace(".mlp.v.", ".mlp_imag.").replace(".mlp.l.", ".mlp_text.")
        key = key.replace(".norm2.v.", ".norm2_imag.").replace(".norm2.l.", ".norm2_text.")
        source[key] = tensor
    save_file(source, str(tmp_path / "vlmo.safetensors"))
    converted = convert(tmp_path / "vlmo.safetensors", "vlmo")
    assert converted.structure["arch"] == "specific"
    model = MultiwayTransformer(small("specific", depth=2, vl_layers=0, layer_scale=0.1, vocab_size=50, max_text_len=12), heads=())
    state, fresh = fit(converted, model)
    load_into(model, state, allow_missing_prefixes=tuple(fresh))
    assert torch.equal(model.layers[1].ffn["l"].fc2.weight, source["transformer.blocks.1.mlp_text.fc2.weight"])
    assert torch.equal(model.layers[1].attn["l"].proj.weight, source["transformer.blocks.1.attn.proj.weight"])


@pytest.mark.parametrize(("arch", "layer_scale", "position"), [
    ("specific", 0.1, "absolute"), ("custom_ffn", 0.0, "absolute"), ("agnostic", 0.0, "absolute"),
    ("specific", 0.1, "relative"), ("custom_ffn", 0.0, "both"),
])
def test_round_trip_vlcluster_vlmo_vlcluster_is_bitwise(tmp_path, arch, layer_scale, position):
    config = preset("tiny", arch, layer_scale=layer_scale, vocab_size=40, num_answers=7, max_text_len=12, position=position)
    torch.manual_seed(4)
    model = MultiwayTransformer(config, heads=("itc", "itm", "mlm", "vqa"))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()  # non-zero key biases, gammas and head biases included
    original = {key: value.clone() for key, value in model.state_dict().items()}
    write_model(StageDir(tmp_path / "model"), original, config, {"stage": "test"})

    export_vlmo(str(tmp_path / "model"), str(tmp_path / "vlmo.safetensors"))
    exported = load_file(str(tmp_path / "vlmo.safetensors"))
    experts = "" if arch == "agnostic" else ".v"
    for key in ("transformer.blocks.0.gamma_1", "transformer.patch_embed.proj.weight", "text_embeddings.word_embeddings.weight",
                f"transformer.blocks.3.mlp{experts}.fc1.weight", "transformer.blocks.3.attn.q_bias" if arch != "specific"
                else "transformer.blocks.3.attn.vl.q_bias"):
        assert key in exported, key
    if not layer_scale:
        assert bool((exported["transformer.blocks.0.gamma_1"] == 1).all())
    if position != "absolute":  # one table: image rows, text->image, image->text, text rows; heads x layers columns
        table = exported["relative_position_bias_table"]
        assert table.shape == ((2 * 4 - 1) ** 2 + 3 + 2 + 2 * 12, config.heads * config.depth)
        assert torch.equal(table[:52, 4:8], original["position_bias.image"][:, 4:8])
        assert torch.equal(table[52:54], original["position_bias.cross"])
    assert ("transformer.pos_embed" in exported) == (position != "relative")
    # Token type 0 is text in their code, the image in ours.
    assert torch.equal(exported["token_type_embeddings.weight"][1], original["embed.token_type.weight"][0])

    convert_to_model_dir(str(tmp_path / "vlmo.safetensors"), "vlmo", str(tmp_path / "back"), size="tiny", heads=config.heads)
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)
    record = json.loads((tmp_path / "back" / "model.json").read_text())
    assert record["config"] == config.to_dict()


def test_cli_convert_beit_then_export(beit_dir, tmp_path, capsys):
    path, _ = beit_dir
    assert main(["convert", "--from", "beit", str(path), "-o", str(tmp_path / "model"), "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "fresh" in out and "embed.text" in out
    record = json.loads((tmp_path / "model" / "model.json").read_text())
    assert (record["config"]["dim"], record["config"]["heads"], record["config"]["arch"]) == (DIM, HEADS, "agnostic")
    assert record["provenance"]["format"] == "beit"
    assert main(["convert", "--to", "vlmo", str(tmp_path / "model"), "-o", str(tmp_path / "vlmo.pt")]) == 0
    exported = torch.load(tmp_path / "vlmo.pt", weights_only=True)["state_dict"]
    assert "transformer.blocks.1.mlp.fc2.weight" in exported
    assert main(["convert", "--from", "beit", str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err



def test_cli_conversions_as_the_docs_show(beit_dir, tmp_path):
    """The three `vlcluster convert` commands of docs/guide/pretrained-weights.md:
    BEiT in with the default `--size base` (what the checkpoint does not fix,
    vocabulary and text length, comes from it), out to VLMo's layout, and back
    with `--from vlmo --heads` bitwise."""
    path, _ = beit_dir
    assert main(["convert", "--from", "beit", str(path), "-o", str(tmp_path / "beit")]) == 0
    config = json.loads((tmp_path / "beit" / "model.json").read_text())["config"]
    assert (config["dim"], config["depth"], config["vocab_size"], config["max_text_len"]) == (DIM, DEPTH, 30522, 40)
    assert main(["convert", "--to", "vlmo", str(tmp_path / "beit"), "-o", str(tmp_path / "vlmo.ckpt")]) == 0
    assert main(["convert", "--from", "vlmo", str(tmp_path / "vlmo.ckpt"), "-o", str(tmp_path / "back"), "--heads", str(HEADS)]) == 0
    original, back = load_file(str(tmp_path / "beit" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[key], original[key]) for key in original)


INIT_FROM_BEIT = """
name: beit_init
stages:
  data: {{kind: data, n_train: 64, n_val: 16, shard_size: 32, image_size: 32}}
  seed:
    kind: pretrain
    model: {{arch: specific, size: tiny, dim: 64, depth: 2, heads: 4, patch_size: 8, layer_scale: 0.1}}
    init: {{checkpoint: "{beit}", format: beit}}
    data: {{from: data}}
    train: {{steps: 2, batch_size: 8, log_every: 1}}
  wrong_width:
    kind: pretrain
    model: {{arch: specific, size: tiny}}
    init: {{checkpoint: "{beit}", format: beit}}
    data: {{from: data}}
    train: {{steps: 2, batch_size: 8}}
"""


@pytest.mark.slow
def test_pretrain_stage_initialised_from_beit_runs(beit_dir, write_job, tmp_path):
    from tests.support.cli import cli

    path, _ = beit_dir
    run_dir = tmp_path / "run"
    result = cli("submit", str(write_job(INIT_FROM_BEIT.format(beit=path))), "--run-dir", str(run_dir))
    assert result.returncode == 1, result.stdout + result.stderr  # wrong_width fails, seed finishes
    assert "seed: done" in result.stdout and "wrong_width: failed" in result.stdout

    log = cli("logs", str(run_dir), "seed").stdout
    assert "initialised from checkpoint" in log and "fresh   embed.text.word.weight" in log
    trained = load_file(str(run_dir / "seed" / "model.safetensors"))
    source = load_file(str(path / "model.safetensors"))
    # Two AdamW steps at lr 2e-4 move a weight by well under 1e-2; BEiT's weights are ~N(0, 0.1).
    for expert in ("v", "l", "vl"):
        drift = trained[f"layers.1.ffn.{expert}.fc1.weight"] - source["encoder.layer.1.intermediate.dense.weight"]
        assert 0 < drift.abs().max() < 1e-2

    failure = cli("logs", str(run_dir), "wrong_width").stdout
    assert "model.dim: the checkpoint has 64, the model 128" in failure
    assert "vlcluster/" not in failure.replace("-m vlcluster.run", "")  # one paragraph, no traceback from our code (torchrun prints its own)


def test_timm_beit_layout_and_a_converted_vlcluster_dir_load(tmp_path):
    # timm names BEiT's blocks like the authors' agnostic stack, without "transformer." and text.
    timm = {key.removeprefix("transformer."): tensor for key, tensor in authors_state(depth=2, vl_from=2).items()
            if key.startswith("transformer.") and ".l." not in key}
    timm = {key.replace(".v.", "."): tensor for key, tensor in timm.items()}
    rows = (2 * (IMAGE // PATCH) - 1) ** 2 + 3
    for i in range(2):  # timm's BEiT: a relative position bias table (and its index buffer) per block
        timm[f"blocks.{i}.attn.relative_position_bias_table"] = torch.randn(rows, HEADS)
        timm[f"blocks.{i}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    torch.save({"model": timm}, tmp_path / "beit_timm.pth")  # BEiT's own releases nest the weights under "model"
    report = convert_to_model_dir(str(tmp_path / "beit_timm.pth"), "beit", str(tmp_path / "model"), size="tiny", heads=HEADS)
    assert report.summary()["dropped"]["blocks.*.attn.relative_position_index"].startswith("buffer")
    assert json.loads((tmp_path / "model" / "model.json").read_text())["config"]["position"] == "both"

    model = MultiwayTransformer(small("custom_attn", layer_scale=0.1, vocab_size=64, max_text_len=32, position="both"), heads=("itc",))
    report = init_from_checkpoint(model, str(tmp_path / "model"), "vlcluster")
    assert set(report.fresh) == {key for key in model.state_dict() if key.startswith("heads.")}
    tables = [timm[f"blocks.{i}.attn.relative_position_bias_table"] for i in range(2)]
    assert torch.equal(model.position_bias.image, torch.cat(tables, dim=1))
    assert torch.equal(model.layers[1].attn["vl"].qkv.weight, timm["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.layers[1].ffn["shared"].fc2.weight, timm["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.layers[0].gamma_attn, timm["blocks.0.gamma_1"])


def test_timm_vit_layout_keeps_its_qkv_bias(tmp_path):
    # timm's ViT: the authors' agnostic block names, one bias for q, k and v, no layer scale.
    timm = {key.removeprefix("transformer.").replace(".v.", "."): tensor for key, tensor in authors_state(depth=2, vl_from=2).items()
            if key.startswith("transformer.") and ".l." not in key and "gamma" not in key and "_bias" not in key}
    for i in range(2):
        timm[f"blocks.{i}.attn.qkv.bias"] = torch.randn(3 * DIM)
    save_file(timm, str(tmp_path / "vit.safetensors"))
    converted = convert(tmp_path / "vit.safetensors", "vit")
    assert converted.structure["position"] == "absolute" and "layer_scale" not in converted.structure
    assert torch.equal(converted.state["layers.1.attn.shared.qkv.bias"], timm["blocks.1.attn.qkv.bias"])  # key bias included
    model = MultiwayTransformer(small("agnostic"), heads=())
    state, fresh = fit(converted, model)
    load_into(model, state, allow_missing_prefixes=tuple(fresh))


def test_unreadable_checkpoints_fail_clearly(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        convert(tmp_path / "junk.pt", "vlmo")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a BEiT checkpoint"):
        convert(tmp_path / "other.safetensors", "beit")
    with pytest.raises(CheckpointError, match="no image embedding"):
        convert(tmp_path / "other.safetensors", "vlmo")


def test_checkpoints_on_object_storage(beit_dir, s3_env, tmp_path):
    from vlcluster.storage.paths import local_copy, run_path, upload_file

    path, _ = beit_dir
    for name in ("model.safetensors", "config.json"):
        upload_file(path / name, run_path(f"s3://data/beit-small/{name}"))
    model = MultiwayTransformer(small("specific", layer_scale=0.1), heads=())
    report = init_from_checkpoint(model, "s3://data/beit-small", "beit")
    assert report.mapped == len(load_file(str(path / "model.safetensors")))
    assert torch.equal(model.layers[0].ffn["l"].fc1.weight, load_file(str(path / "model.safetensors"))["encoder.layer.0.intermediate.dense.weight"])

    convert_to_model_dir("s3://data/beit-small", "beit", "s3://runs/converted", size="tiny")
    export_vlmo("s3://runs/converted", "s3://runs/converted-vlmo.safetensors")
    assert json.loads(run_path("s3://runs/converted/model.json").read_bytes())["provenance"]["format"] == "beit"
    exported = load_file(str(local_copy("s3://runs/converted-vlmo.safetensors")))
    assert torch.equal(exported["transformer.blocks.1.mlp.fc1.weight"], model.layers[1].ffn["v"].fc1.weight)


def test_converted_model_dir_initialises_only_the_fresh_parts(beit_dir, tmp_path):
    path, _ = beit_dir
    convert_to_model_dir(str(path), "beit", str(tmp_path / "a"), size="tiny", seed=5)
    convert_to_model_dir(str(path), "beit", str(tmp_path / "b"), size="tiny", seed=5)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # reproducible
    word, pos = a["embed.text.word.weight"], a["embed.text.pos"]
    assert 0.01 < float(word.std()) < 0.03 and float(word.abs().max()) <= 0.04 + 1e-6  # trunc. normal, std 0.02
    assert 0.01 < float(pos.std()) < 0.03
    assert torch.isfinite(a["embed.token_type.weight"]).all() and a["embed.token_type.weight"].abs().max() <= 0.04 + 1e-6


# --- out of vlcluster: the image route as a transformers BEiT, and load_model ------------------


@pytest.mark.parametrize("variant", ["per_layer_mean_pooling", "shared_and_absolute"])
def test_to_beit_loads_in_transformers_as_the_same_function(tmp_path, variant):
    import vlcluster

    changes, _, _ = BEIT_VARIANTS[variant]
    beit = randomised(saved_beit(tmp_path / "beit", **changes)).eval()
    beit.save_pretrained(tmp_path / "beit")
    assert main(["convert", "--from", "beit", str(tmp_path / "beit"), "-o", str(tmp_path / "model"), "--size", "tiny"]) == 0
    model = vlcluster.load_model(tmp_path / "model")
    assert model.config.position == BEIT_VARIANTS[variant][1]
    assert main(["convert", "--to", "beit", str(tmp_path / "model"), "-o", str(tmp_path / "out")]) == 0
    exported = transformers.BeitModel.from_pretrained(tmp_path / "out").eval()
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # The converted model's fresh token type is folded into BEiT's [CLS] and patch bias.
        torch.testing.assert_close(exported(pixel_values=images).last_hidden_state, model.encode_image(images), atol=1e-5, rtol=0)
        model.embed["token_type"].weight.zero_()  # BEiT has none: then the round trip is BEiT itself
    write_model(StageDir(tmp_path / "zeroed"), model.state_dict(), model.config, {"stage": "test"})
    assert main(["convert", "--to", "beit", str(tmp_path / "zeroed"), "-o", str(tmp_path / "out2")]) == 0
    again = transformers.BeitModel.from_pretrained(tmp_path / "out2").eval()
    with torch.no_grad():
        assert (again(pixel_values=images).last_hidden_state - beit_tokens(beit, images)).abs().max() < 1e-5


def test_load_model_reads_stage_and_converted_dirs_and_training_checkpoints(beit_dir, tmp_path):
    import vlcluster
    from vlcluster.train import checkpoint as ckpt
    from vlcluster.train.dist import DistEnv

    config = preset("tiny", "specific", position="relative", vocab_size=40, max_text_len=12)
    torch.manual_seed(3)
    trained = MultiwayTransformer(config, heads=("itc", "itm")).eval()
    with torch.no_grad():
        for table in trained.position_bias.parameters():
            table.normal_()
    images = torch.randn(2, 3, 32, 32)
    ids, mask = torch.randint(0, 40, (2, 12)), torch.ones(2, 12, dtype=torch.bool)
    write_model(StageDir(tmp_path / "stage"), trained.state_dict(), config, {"stage": "vlpt"})
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    objective_state = {f"model.{key}": value for key, value in trained.state_dict().items()}  # as training saves it
    step = ckpt.save_checkpoint(tmp_path / "checkpoints", 7, env, objective_state, {"state": {}, "param_groups": []},
                                {"spec_hash": "h", "world_size": 1, "model_config": config.to_dict()}, {}, {}, keep=2)
    for path in (tmp_path / "stage", step):
        loaded = vlcluster.load_model(path)
        assert set(loaded.heads) == {"itc", "itm"} and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(images), trained.encode_image(images))
            assert torch.equal(loaded.encode_text(ids, mask), trained.encode_text(ids, mask))
            assert torch.equal(loaded.fusion(images, ids, mask), trained.fusion(images, ids, mask))
    path, _ = beit_dir
    convert_to_model_dir(str(path), "beit", str(tmp_path / "converted"), size="tiny")
    assert vlcluster.load_model(tmp_path / "converted").config.dim == DIM
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        vlcluster.load_model(tmp_path)
