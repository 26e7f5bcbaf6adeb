import math

import pytest
import torch

from vlcluster.model import (
    ARCHS,
    ModelConfig,
    MultiwayTransformer,
    expand_to_experts,
    experts_for,
    load_into,
    parse_layer_key,
    preset,
)

B, L = 3, 10


def tiny(arch: str, **kw) -> ModelConfig:
    return preset("tiny", arch, **kw)


def build(arch: str, seed: int = 0, **kw) -> MultiwayTransformer:
    torch.manual_seed(seed)
    return MultiwayTransformer(tiny(arch), **kw).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    cfg = tiny("agnostic")
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 6:] = False  # one padded row exercises the key-padding mask
    return images, ids, mask


def layer_experts(model: MultiwayTransformer) -> dict[tuple[int, str], set[str]]:
    out: dict[tuple[int, str], set[str]] = {}
    for name, _ in model.named_parameters():
        if name.startswith("layers."):
            parsed = parse_layer_key(name)
            assert parsed is not None, name
            out.setdefault(parsed[:2], set()).add(parsed[2])
    return out


# --- config ---------------------------------------------------------------


def test_size_presets_and_structure_overrides():
    vit_tiny = preset("vit_tiny", "specific")
    assert (vit_tiny.dim, vit_tiny.depth, vit_tiny.heads, vit_tiny.patch_size, vit_tiny.image_size) == (192, 12, 3, 16, 224)
    assert vit_tiny.num_patches == 196
    small = preset("base", "agnostic", dim=96, depth=3, heads=2, vl_layers=1, patch_size=8, image_size=32)
    model = MultiwayTransformer(small, heads=())
    assert (len(model.layers), model.layers[0].attn["shared"].heads) == (3, 2)
    # base is VLMo-base's positions: a relative bias per layer, no absolute tables.
    assert small.position == "relative" and not hasattr(model.embed["image"], "pos")
    assert model.position_bias.image.shape == ((2 * 4 - 1) ** 2 + 3, 2 * 3)
    assert preset("tiny", "agnostic").position == "absolute"
    with pytest.raises(ValueError, match="position: must be one of"):
        preset("tiny", "agnostic", position="rotary")
    with pytest.raises(ValueError, match="relative_bias: must be one of"):
        preset("tiny", "agnostic", position="relative", relative_bias="per_head")
    with pytest.raises(ValueError, match="heads: dim 96 is not divisible by heads 5"):
        preset("base", "agnostic", dim=96, heads=5)
    with pytest.raises(ValueError, match="vl_layers: must be in"):
        preset("tiny", "agnostic", depth=2, vl_layers=3)



def test_config_roundtrip_and_validation():
    cfg = tiny("specific")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.with_arch("agnostic").arch == "agnostic"
    assert (cfg.bottom_layers, cfg.num_patches) == (3, 16)
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="unknown model size"):
        preset("huge", "specific")
    with pytest.raises(ValueError, match="unknown arch"):
        preset("tiny", "moe")
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        preset("tiny", "specific", depht=3)


def test_experts_for():
    spec, ln = tiny("specific"), tiny("custom_ln")
    assert experts_for(spec, 0, "attn") == ("v", "l")
    assert experts_for(spec, 3, "attn") == ("v", "l", "vl")
    assert experts_for(ln, 3, "attn") == ("shared",)
    assert experts_for(ln, 3, "ln2") == ("v", "l", "vl")
    assert experts_for(tiny("agnostic"), 3, "ln1") == ("shared",)


# --- naming ----------------------------------------------------------------


def test_naming_specific():
    names = set(dict(build("specific").named_parameters()))
    assert "layers.3.attn.vl.qkv.weight" in names
    assert "layers.2.attn.vl.qkv.weight" not in names
    assert {"layers.0.attn.v.qkv.weight", "layers.0.ffn.l.fc1.weight", "layers.2.ln1.v.weight"} <= names
    assert not any(".shared." in n or ".experts." in n for n in names)


def test_naming_agnostic():
    experts = layer_experts(build("agnostic"))
    assert set(map(frozenset, experts.values())) == {frozenset({"shared"})}
    assert len(experts) == 4 * 4  # depth x parts


@pytest.mark.parametrize(
    "arch, custom",
    [("custom_attn", {"attn"}), ("custom_ffn", {"ffn"}), ("custom_ln", {"ln1", "ln2"}), ("specific", None)],
)
def test_naming_shared_weight_variants(arch, custom):
    model = build(arch)
    top = model.config.bottom_layers
    for (layer, part), experts in layer_experts(model).items():
        if custom is not None and part not in custom:
            assert experts == {"shared"}, (layer, part)
        else:
            assert experts == ({"v", "l", "vl"} if layer >= top else {"v", "l"}), (layer, part)
    assert layer_experts(model) == {
        (i, p): set(experts_for(model.config, i, p)) for i in range(4) for p in ("attn", "ffn", "ln1", "ln2")
    }


def test_non_layer_names():
    names = set(dict(build("specific").named_parameters()))
    assert {"embed.image.cls", "embed.image.pos", "embed.image.patch.weight", "embed.text.word.weight",
            "embed.text.pos", "embed.token_type.weight", "norm.weight", "heads.itc.logit_scale",
            "heads.itc.image.weight", "heads.itc.text.weight", "heads.itm.pool.weight",
            "heads.itm.classifier.weight", "heads.mlm.decoder.weight", "heads.vqa.fc2.weight"} <= names
    no_vqa = MultiwayTransformer(tiny("specific", num_answers=0))
    assert "vqa" not in no_vqa.heads


def test_init():
    model = build("specific")
    assert model.heads["itc"].logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert torch.equal(model.layers[0].ln1["v"].weight, torch.ones(128))
    assert torch.count_nonzero(model.layers[0].attn["v"].qkv.bias) == 0
    assert model.layers[0].attn["v"].qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    # meta-built models initialise after materialisation (FSDP / checkpoint-loading path)
    with torch.device("meta"):
        meta = MultiwayTransformer(tiny("specific"))
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert meta.heads["itc"].logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert torch.equal(meta.norm.weight, torch.ones(128))


@pytest.mark.parametrize("arch", ["specific", "custom_attn", "custom_ffn", "custom_ln"])
def test_experts_start_from_one_initialisation(arch):
    """Paper §3: every transformer starts from the same initialisation,
    whatever the modality; otherwise a K_seed = 0 merge averages unrelated weights."""
    for model in (build(arch), _materialised_on_meta(arch)):
        state = model.state_dict()
        groups = 0
        for key, value in state.items():
            parsed = parse_layer_key(key)
            if parsed is None or parsed[2] in ("v", "shared"):
                continue
            layer, part, _, rest = parsed
            assert torch.equal(value, state[f"layers.{layer}.{part}.v.{rest}"]), key
            groups += 1
        assert groups > 0
        # Experts are copies, never the same tensor.
        assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))


def _materialised_on_meta(arch: str) -> MultiwayTransformer:
    with torch.device("meta"):
        model = MultiwayTransformer(tiny(arch))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


# --- forward ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes(arch, batch):
    images, ids, mask = batch
    model = build(arch)
    P1 = model.config.num_patches + 1
    img, txt = model.encode_image(images), model.encode_text(ids, mask)
    fused = model.fusion(images, ids, mask)
    assert img.shape == (B, P1, 128) and txt.shape == (B, L, 128)
    assert fused.shape == (B, P1 + L, 128)
    heads = model.heads
    zi, zt = heads["itc"](img[:, 0], txt[:, 0])
    assert zi.shape == zt.shape == (B, 128)
    assert heads["itm"](fused[:, 0]).shape == (B, 2)
    assert heads["vqa"](fused[:, 0]).shape == (B, 15)
    assert heads["mlm"](fused[:, P1:]).shape == (B, L, 64)
    assert all(t.isfinite().all() for t in (img, txt, fused))


@pytest.mark.parametrize("arch", ["specific", "agnostic"])
def test_padding_mask_respected(arch, batch):
    images, ids, mask = batch
    model = build(arch)
    ids2 = ids.clone()
    ids2[0, 6:] = (ids2[0, 6:] + 1) % model.config.vocab_size  # change only padded tokens
    real = mask[0]
    torch.testing.assert_close(model.encode_text(ids, mask)[0, real], model.encode_text(ids2, mask)[0, real])
    P1 = model.config.num_patches + 1
    f1, f2 = model.fusion(images, ids, mask)[0], model.fusion(images, ids2, mask)[0]
    torch.testing.assert_close(f1[:P1], f2[:P1])
    torch.testing.assert_close(f1[P1:][real], f2[P1:][real])
    assert not torch.allclose(model.encode_text(ids, None)[0, :6], model.encode_text(ids2, None)[0, :6])


def test_routing_errors(batch):
    images, _, _ = batch
    model = build("specific")
    x = model.embed_image(images)
    with pytest.raises(KeyError, match="no 'vl' expert"):
        model.run_layers(x, "vl", 0, 1)
    with pytest.raises(ValueError, match="unknown modality"):
        build("agnostic").run_layers(x, "image", 0, 1)


def test_fusion_gradients_follow_routes(batch):
    images, ids, mask = batch
    model = build("specific")
    model.fusion(images, ids, mask).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert "layers.2.attn.v.qkv.weight" in grads and "layers.2.ffn.l.fc1.weight" in grads
    assert "layers.3.attn.vl.qkv.weight" in grads
    # the top layer's unimodal experts are only on the retrieval route
    assert "layers.3.attn.v.qkv.weight" not in grads and "layers.3.ffn.l.fc1.weight" not in grads


def test_agnostic_routes_share_weights(batch):
    images, ids, mask = batch
    model = build("agnostic")
    x = model.embed_image(images)
    depth = model.config.depth
    outs = [model.run_layers(x, m, 0, depth) for m in ("v", "l", "vl")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.testing.assert_close(model.encode_image(images), model.norm(outs[0]), rtol=0, atol=0)
    # the fusion route is the same computation as concatenated bottom outputs through "vl"
    bi, bt = model.bottom_image(images), model.bottom_text(ids, mask)
    torch.testing.assert_close(model.fuse(bi, bt, mask), model.fusion(images, ids, mask), rtol=0, atol=0)
    torch.testing.assert_close(model.finish(bt, "l", mask), model.encode_text(ids, mask), rtol=0, atol=0)


# --- conversion ------------------------------------------------------------


@pytest.mark.parametrize("arch", ["specific", "custom_attn", "custom_ffn", "custom_ln"])
def test_expand_from_agnostic_is_exact(arch, batch):
    images, ids, mask = batch
    src, dst = build("agnostic", seed=0), build(arch, seed=1)
    load_into(dst, expand_to_experts(src.state_dict(), dst))
    with torch.no_grad():
        assert torch.equal(src.encode_image(images), dst.encode_image(images))
        assert torch.equal(src.encode_text(ids, mask), dst.encode_text(ids, mask))
        f_src, f_dst = src.fusion(images, ids, mask), dst.fusion(images, ids, mask)
        assert torch.equal(f_src, f_dst)
        assert torch.equal(src.heads["vqa"](f_src[:, 0]), dst.heads["vqa"](f_dst[:, 0]))


def test_expand_clones_and_keeps_same_experts():
    src, dst = build("specific", seed=0), build("specific", seed=1)
    state = expand_to_experts(src.state_dict(), dst)
    for k, v in src.state_dict().items():
        assert torch.equal(state[k], v)
    ptrs = {t.data_ptr() for t in state.values()}
    assert len(ptrs) == len(state) and not ptrs & {t.data_ptr() for t in src.state_dict().values()}
    # agnostic -> specific: every expert of one part is its own copy of the shared weight
    state = expand_to_experts(build("agnostic").state_dict(), dst)
    v, l = state["layers.3.attn.v.qkv.weight"], state["layers.3.attn.l.qkv.weight"]
    assert torch.equal(v, l) and v.data_ptr() != l.data_ptr()


def scaled(arch: str, seed: int, layer_scale: float) -> MultiwayTransformer:
    torch.manual_seed(seed)
    model = MultiwayTransformer(tiny(arch, layer_scale=layer_scale)).eval()
    with torch.no_grad():  # trained gammas: no longer all one value
        for name, param in model.named_parameters():
            if ".gamma_" in name:
                param.uniform_(0.05, 0.5)
    return model


def test_expand_keeps_layer_scale_or_refuses_to_drop_it(batch):
    src = scaled("agnostic", 0, layer_scale=0.1)
    with pytest.raises(ValueError, match=r"layer scale: layers\.0\.gamma_attn.*model\.layer_scale"):
        expand_to_experts(src.state_dict(), build("specific"))  # the gammas would be dropped: another function
    dst = MultiwayTransformer(tiny("specific", layer_scale=0.1)).eval()
    load_into(dst, expand_to_experts(src.state_dict(), dst))
    images, ids, mask = batch
    assert torch.equal(src.encode_image(images), dst.encode_image(images))
    ones = {key: (torch.ones_like(value) if ".gamma_" in key else value) for key, value in src.state_dict().items()}
    assert not any(".gamma_" in key for key in expand_to_experts(ones, build("specific")))  # gammas of 1 scale nothing


def test_expand_refuses_collapsing_experts():
    with pytest.raises(ValueError, match="needs a merge"):
        expand_to_experts(build("specific").state_dict(), build("agnostic"))
    with pytest.raises(ValueError, match="needs a merge"):
        expand_to_experts(build("custom_ln").state_dict(), build("custom_attn"))
    with pytest.raises(ValueError, match="depth mismatch"):
        expand_to_experts(build("agnostic").state_dict(), MultiwayTransformer(tiny("agnostic", depth=3)))


def test_parse_layer_key():
    assert parse_layer_key("layers.3.attn.vl.qkv.weight") == (3, "attn", "vl", "qkv.weight")
    assert parse_layer_key("layers.2.ln1.v.weight") == (2, "ln1", "v", "weight")
    assert parse_layer_key("embed.text.word.weight") is None
    assert parse_layer_key("heads.mlm.norm.weight") is None


def test_load_into_errors():
    model = build("specific")
    state = model.state_dict()
    without_vqa = {k: v for k, v in state.items() if not k.startswith("heads.vqa.")}
    load_into(model, without_vqa)  # fresh task head is fine
    with pytest.raises(ValueError, match="unexpected keys: bogus.weight"):
        load_into(model, {**state, "bogus.weight": torch.zeros(1)})
    missing = dict(state)
    del missing["layers.0.attn.v.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing keys: layers\.0\.attn\.v\.qkv\.weight"):
        load_into(model, missing)
    with pytest.raises(ValueError, match="missing keys: heads.vqa"):
        load_into(model, without_vqa, allow_missing_prefixes=())


# --- size ------------------------------------------------------------------

# Sung et al. 2023, ViT-B/16 backbone + embeddings + VQA head.
PAPER_PARAMS_M = {"specific": 217, "agnostic": 118, "custom_attn": 151, "custom_ffn": 184, "custom_ln": 118}


@pytest.mark.parametrize("arch", ARCHS)
def test_base_param_counts_on_meta(arch):
    with torch.device("meta"):
        model = MultiwayTransformer(preset("base", arch), heads=("vqa",))
    assert all(p.is_meta for p in model.parameters())
    n = model.num_params() / 1e6
    print(f"{arch}: {n:.1f}M (paper {PAPER_PARAMS_M[arch]}M), non-embedding {model.num_params(True) / 1e6:.1f}M")
    assert abs(n - PAPER_PARAMS_M[arch]) / PAPER_PARAMS_M[arch] < 0.10


# --- layer scale ------------------------------------------------------------


def test_layer_scale_scales_each_residual_branch(batch):
    images, ids, mask = batch
    torch.manual_seed(0)
    plain = MultiwayTransformer(tiny("specific"), heads=()).eval()
    torch.manual_seed(0)
    scaled = MultiwayTransformer(tiny("specific", layer_scale=0.1), heads=()).eval()
    extra = set(scaled.state_dict()) - set(plain.state_dict())
    assert extra == {f"layers.{i}.gamma_{b}" for i in range(4) for b in ("attn", "ffn")}
    assert all(float(v.min()) == float(v.max()) == pytest.approx(0.1) for k, v in scaled.state_dict().items() if k in extra)
    scaled.load_state_dict({**plain.state_dict(), **{k: scaled.state_dict()[k] for k in extra}})
    with torch.no_grad():
        x = scaled.embed_image(images)
        block_plain, block_scaled = plain.layers[0], scaled.layers[0]
        attn = block_plain.attn(block_plain.ln1(x, "v"), "v")
        h = x + 0.1 * attn
        expected = h + 0.1 * block_plain.ffn(block_plain.ln2(h, "v"), "v")
        torch.testing.assert_close(block_scaled(x, "v"), expected)
        # gammas of one are the plain block, exactly
        for block in scaled.layers:
            block.gamma_attn.fill_(1.0)
            block.gamma_ffn.fill_(1.0)
        assert torch.equal(scaled.encode_text(ids, mask), plain.encode_text(ids, mask))


def test_layer_scale_is_shared_by_experts_and_never_merged():
    from vlcluster.merge.layout import CopyTensor, plan_merge
    from vlcluster.metrics.distance import vl_pairs

    torch.manual_seed(0)
    seed = MultiwayTransformer(tiny("agnostic", layer_scale=0.1), heads=())
    with torch.no_grad():
        seed.layers[2].gamma_ffn.normal_()
    vl = MultiwayTransformer(tiny("specific", layer_scale=0.1), heads=())
    state = expand_to_experts(seed.state_dict(), vl)
    load_into(vl, state)
    assert torch.equal(vl.layers[2].gamma_ffn, seed.layers[2].gamma_ffn)
    steps = {step.key: step for step in plan_merge(vl.state_dict())}
    assert steps["layers.2.gamma_ffn"] == CopyTensor("layers.2.gamma_ffn", "layers.2.gamma_ffn")
    assert not any("gamma" in key for pairs in vl_pairs(vl.state_dict()).values() for pair in pairs for key in pair)


# --- relative position bias -------------------------------------------------------


def relative(arch: str = "specific", seed: int = 0, **kw) -> MultiwayTransformer:
    """A relative-position model with random bias tables (they start at zero)."""
    torch.manual_seed(seed)
    model = MultiwayTransformer(tiny(arch, position="relative", **kw), heads=()).eval()
    with torch.no_grad():
        for table in model.position_bias.parameters():
            table.normal_()
    return model


def test_relative_index_layout_follows_vlmo():
    from vlcluster.model.posbias import fused_index, image_index, image_rows, text_index

    grid, text_len = 3, 6  # image table: 25 distance rows + 3 [CLS] rows
    image = image_index(grid)
    assert image.shape == (10, 10) and image_rows(grid) == 28
    # patch (row 0, col 0) querying patch (row 2, col 1): dy = -2, dx = -1 -> (0) * 5 + 1
    assert image[1, 1 + 2 * 3 + 1] == 1 and image[1 + 2 * 3 + 1, 1] == 4 * 5 + 3
    assert (image[0, 1:] == 25).all() and (image[1:, 0] == 26).all() and image[0, 0] == 27
    assert (image.diagonal()[1:] == 2 * 5 + 2).all()  # distance (0, 0)
    text = text_index(text_len, 4)  # rows j - i + T - 2, key minus query; [CLS] rows 2T-3 ..
    assert text[1, 3] == 2 + 4 and text[3, 1] == -2 + 4
    assert (text[0, 1:] == 9).all() and (text[1:, 0] == 10).all() and text[0, 0] == 11
    fused = fused_index(grid, text_len, 4)
    assert fused.shape == (14, 14)
    assert (fused[:10, 10:] == 29).all() and (fused[10:, :10] == 28).all()  # image->text, text->image
    assert torch.equal(fused[:10, :10], image) and torch.equal(fused[10:, 10:], text + 30)


def test_relative_model_has_no_absolute_tables_and_masks_padding(batch):
    images, ids, mask = batch
    model = relative()
    assert not any(name.endswith(".pos") for name in model.state_dict())
    assert {name for name in model.state_dict() if name.startswith("position_bias.")} == {
        "position_bias.image", "position_bias.cross", "position_bias.text"}
    assert model.position_bias.image.shape[1] == 4 * 4  # heads x layers
    short = model.encode_text(ids[:1, :6])
    padded = model.encode_text(ids[:1], mask[:1])
    torch.testing.assert_close(padded[:, :6], short, atol=1e-5, rtol=1e-5)  # padding changes nothing real
    fused_short = model.fusion(images[:1], ids[:1, :6])
    fused_padded = model.fusion(images[:1], ids[:1], mask[:1])
    torch.testing.assert_close(fused_padded[:, : 17 + 6], fused_short, atol=1e-5, rtol=1e-5)


def test_each_bias_table_reaches_only_its_routes(batch):
    images, ids, mask = batch
    model = relative()
    before = (model.encode_image(images), model.encode_text(ids, mask), model.fusion(images, ids, mask))
    with torch.no_grad():
        model.position_bias.cross[1].add_(3.0)  # image -> text pairs: only the fused route's top layers
    after = (model.encode_image(images), model.encode_text(ids, mask), model.fusion(images, ids, mask))
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert (before[2] - after[2]).abs().max() > 1e-3
    with torch.no_grad():
        # The last layer's columns (a constant for every key would change no softmax: random rows).
        model.position_bias.image[:, -4:].add_(torch.randn(model.position_bias.image.shape[0], 4))
    last = model.encode_image(images)
    bottom = model.bottom_image(images)  # layers 0..2 do not read the last layer's columns
    torch.testing.assert_close(bottom, model.run_layers(model.embed_image(images), "v", 0, 3))
    assert (last - before[0]).abs().max() > 1e-3


def test_shared_bias_is_one_table_for_every_layer(batch):
    images, _, _ = batch
    shared = relative(relative_bias="shared")
    assert shared.position_bias.image.shape[1] == 4  # heads
    per_layer = relative(relative_bias="per_layer")
    with torch.no_grad():
        per_layer.load_state_dict({**shared.state_dict(), **{
            f"position_bias.{name}": table.repeat(1, 4) for name, table in shared.position_bias.named_parameters()}})
    torch.testing.assert_close(per_layer.encode_image(images), shared.encode_image(images), atol=1e-6, rtol=0)


def test_relative_image_table_is_resized_for_another_resolution():
    from vlcluster.model.posbias import resize_image_table
    from vlcluster.model.posembed import fit_position_table

    low = relative(image_size=32)  # 4 x 4 patches: 7 x 7 distances
    high = MultiwayTransformer(tiny("specific", position="relative", image_size=48), heads=())  # 6 x 6: 11 x 11
    state = fit_position_table(low.state_dict(), high)
    load_into(high, state, allow_missing_prefixes=())
    assert high.position_bias.image.shape == (11 * 11 + 3, 16)
    assert torch.equal(high.position_bias.image[-3:], low.position_bias.image[-3:])  # [CLS] rows kept
    assert torch.equal(high.position_bias.text, low.position_bias.text)
    assert torch.equal(resize_image_table(low.position_bias.image.detach(), 4), low.position_bias.image.detach())
    # A field linear in (dy, dx) stays one, with the centre (distance 0) where it was.
    dy, dx = torch.meshgrid(torch.arange(7.0) - 3, torch.arange(7.0) - 3, indexing="ij")
    table = torch.cat([(dy + 2 * dx).reshape(49, 1), torch.full((3, 1), 9.0)])
    resized = resize_image_table(table, 6)[:-3, 0].reshape(11, 11)
    assert resized[5, 5].abs() < 1e-4 and (resized.diff(dim=0) > 0).all() and (resized.diff(dim=1) > 0).all()
    assert math.isfinite(high.encode_image(torch.zeros(1, 3, 48, 48)).sum().item())


def test_old_configs_read_as_absolute_and_a_stage_keeps_its_init_models_positions(write_job, tmp_path):
    from vlcluster.stages.context import StageContext
    from vlcluster.graph import build_graph
    from vlcluster.jobspec.load import load_pipeline
    from vlcluster.model.files import write_model
    from vlcluster.stages.rundir import StageDir
    from vlcluster.stages.train import build_model_config

    old = {key: value for key, value in tiny("specific").to_dict().items() if key not in ("position", "relative_bias")}
    assert ModelConfig.from_dict(old).position == "absolute"  # a model.json written before positions were a field
    path = write_job("""
        name: positions
        stages:
          data: {kind: data, n_train: 8, n_val: 8, shard_size: 8, image_size: 32}
          seed: {kind: pretrain, model: {size: base, arch: agnostic, dim: 64, heads: 4, depth: 2, vl_layers: 1, patch_size: 8}, data: {from: data}, train: {steps: 1, batch_size: 8}}
          vlpt: {kind: pretrain, model: {size: base, arch: specific, dim: 64, heads: 4, depth: 2, vl_layers: 1, patch_size: 8}, init: {from: seed}, data: {from: data}, train: {steps: 1, batch_size: 8}}
          chosen: {kind: pretrain, model: {size: base, arch: specific, dim: 64, heads: 4, depth: 2, vl_layers: 1, patch_size: 8, position: relative}, init: {from: seed}, data: {from: data}, train: {steps: 1, batch_size: 8}}
    """)
    graph = build_graph(load_pipeline(path, []), str(path))
    seed = StageContext(tmp_path / "run", "seed", graph)
    assert build_model_config(seed, 64, 0).position == "relative"  # base is VLMo's: relative
    # The seed was trained as an absolute-position model (e.g. before base became relative).
    # The seed scales its residual branches (BEiT's layer scale): the VL stage keeps that too.
    seed_config = build_model_config(seed, 64, 0).to_dict() | {"position": "absolute", "layer_scale": 0.1}
    write_model(StageDir(tmp_path / "run" / "seed"), {}, ModelConfig.from_dict(seed_config), {"stage": "seed"})
    vlpt = build_model_config(StageContext(tmp_path / "run", "vlpt", graph), 64, 0)
    assert (vlpt.position, vlpt.layer_scale) == ("absolute", 0.1)
    assert build_model_config(StageContext(tmp_path / "run", "chosen", graph), 64, 0).position == "relative"
