"""The authors' VLMo / vl-merging state-dict layout, both directions.

Their multiway transformer lives under ``transformer.``; a block part with
modality experts has the expert as a sub-module (``blocks.{i}.attn.v.qkv``),
a shared one has none (``blocks.{i}.attn.qkv``). The original VLMo release
names its FFN experts ``mlp_imag/mlp_text/mlp_vl`` and ``norm2_imag/…``;
those are read as aliases. Differences that matter for conversion:

- attention has a bias-free ``qkv`` plus ``q_bias`` and ``v_bias``; there is
  no key bias. A key bias adds the same value to every score of a query, so
  softmax ignores it: dropping it keeps the function (vlcluster keeps it
  under ``vlcluster.`` so a round trip stays bitwise);
- every block has layer-scale gammas (``gamma_1``, ``gamma_2``); a model
  without layer scale is written with gammas of one (the identity);
- the text embedding is BERT's (with a LayerNorm and token-type table of its
  own); its position table is ``[L, D]`` where vlcluster's is ``[1, L, D]``.
  With relative positions BERT adds no position table, so the embedding of a
  token depends on its id alone: LayerNorm(word + token type 0) is folded
  into vlcluster's word table (the same function);
- token type 0 is text and 1 the image there, the other way round in vlcluster;
- relative position bias is one top-level table ``relative_position_bias_table``
  [image rows; text->image, image->text; text rows] x (heads x layers), text
  rows for ``max_text_len_of_initckpt`` distances (vlcluster: max_text_len).
  It is read whole (``position_bias.table``) and split for the model in
  ``external.fit``, where the model's grid and text length are known.

Tensors without a counterpart in the authors' layout are written under the
prefix ``vlcluster.``; their loader (non-strict) ignores them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import posbias
from ..config import SHARED, ModelConfig
from ..convert import layer_key, parse_layer_key
from .conversion import CheckpointError, ConversionReport

EXTRA = "vlcluster."
BLOCKS = "transformer.blocks"

# vlcluster part -> the authors' module name of that part in a block.
PART_NAMES = {"attn": "attn", "ffn": "mlp", "ln1": "norm1", "ln2": "norm2"}
GAMMAS = {"gamma_attn": "gamma_1", "gamma_ffn": "gamma_2"}

# Tensors outside the blocks: vlcluster key -> (authors' key, vlcluster has an extra leading 1-dim).
GLOBAL: dict[str, tuple[str, bool]] = {
    "embed.image.patch.weight": ("transformer.patch_embed.proj.weight", False),
    "embed.image.patch.bias": ("transformer.patch_embed.proj.bias", False),
    "embed.image.cls": ("transformer.cls_token", False),
    "embed.image.pos": ("transformer.pos_embed", False),
    "embed.text.word.weight": ("text_embeddings.word_embeddings.weight", False),
    "embed.text.pos": ("text_embeddings.position_embeddings.weight", True),
    "norm.weight": ("transformer.norm.weight", False),
    "norm.bias": ("transformer.norm.bias", False),
    # Heads (vl-merging / ViLT names).
    "heads.itm.pool.weight": ("pooler.dense.weight", False),
    "heads.itm.pool.bias": ("pooler.dense.bias", False),
    "heads.itm.classifier.weight": ("itm_score.fc.weight", False),
    "heads.itm.classifier.bias": ("itm_score.fc.bias", False),
    "heads.mlm.dense.weight": ("mlm_score.transform.dense.weight", False),
    "heads.mlm.dense.bias": ("mlm_score.transform.dense.bias", False),
    "heads.mlm.norm.weight": ("mlm_score.transform.LayerNorm.weight", False),
    "heads.mlm.norm.bias": ("mlm_score.transform.LayerNorm.bias", False),
    "heads.mlm.decoder.weight": ("mlm_score.decoder.weight", False),
    "heads.mlm.decoder.bias": ("mlm_score.bias", False),
    "heads.itc.image.weight": ("ifm_image_proj.fc.weight", False),
    "heads.itc.text.weight": ("ifm_text_proj.fc.weight", False),
    "heads.itc.logit_scale": ("logit_scale", True),
    "heads.vqa.fc1.weight": ("vqa_classifier.0.weight", False),
    "heads.vqa.fc1.bias": ("vqa_classifier.0.bias", False),
    "heads.vqa.norm.weight": ("vqa_classifier.1.weight", False),
    "heads.vqa.norm.bias": ("vqa_classifier.1.bias", False),
    "heads.vqa.fc2.weight": ("vqa_classifier.3.weight", False),
    "heads.vqa.fc2.bias": ("vqa_classifier.3.bias", False),
}
GLOBAL_BY_AUTHORS = {theirs: (ours, lead) for ours, (theirs, lead) in GLOBAL.items()}
TOKEN_TYPES = ("embed.token_type.weight", "token_type_embeddings.weight")  # rows swapped: image/text
BIAS_TABLE = "relative_position_bias_table"
WHOLE_TABLE = "position_bias.table"  # the authors' table, split in external.fit
BIAS_PARTS = ("position_bias.image", "position_bias.cross", "position_bias.text")  # their row order
TEXT_NORM = "text_embeddings.LayerNorm"
TEXT_TYPES = "text_embeddings.token_type_embeddings.weight"
TEXT_POSITIONS = "text_embeddings.position_embeddings.weight"

# Original VLMo names of FFN experts -> the vl-merging names read here.
ALIASES = {
    ".mlp_imag.": ".mlp.v.", ".mlp_text.": ".mlp.l.", ".mlp_vl.": ".mlp.vl.",
    ".norm2_imag.": ".norm2.v.", ".norm2_text.": ".norm2.l.", ".norm2_vl.": ".norm2.vl.",
}

# Source tensors with no vlcluster counterpart, and what dropping them means.
DROP_REASONS: list[tuple[str, str]] = [
    (r"relative_position_index$", "buffer: the relative position index is recomputed"),
    (r"mask_token$", "masked-image-modelling token: no counterpart"),
    (r"^text_embeddings\.LayerNorm\.", "BERT text-embedding LayerNorm: vlcluster's text embedding has none "
     "(the text route differs until trained)"),
    (r"^text_embeddings\.token_type_embeddings\.", "BERT token types: vlcluster has one image/text token type"),
    (r"^text_embeddings\.position_ids$", "buffer"),
]

_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.(attn|mlp|norm1|norm2)(?:\.(v|l|vl))?\.(.+)$")
_GAMMA = re.compile(r"^transformer\.blocks\.(\d+)\.(gamma_1|gamma_2)$")
_PART_BY_NAME = {name: part for part, name in PART_NAMES.items()}
_GAMMA_BY_NAME = {name: ours for ours, name in GAMMAS.items()}


def _block_name(layer: int, part: str, expert: str, rest: str) -> str:
    suffix = "" if expert == SHARED else f".{expert}"
    return f"{BLOCKS}.{layer}.{PART_NAMES[part]}{suffix}.{rest}"


# --- vlcluster -> authors -------------------------------------------------------


def export_state(state: Mapping[str, Tensor], config: ModelConfig, report: ConversionReport) -> dict[str, Tensor]:
    """A vlcluster state dict in the authors' layout."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        parsed = parse_layer_key(key)
        if parsed is not None:
            _export_layer_tensor(parsed, tensor, out)
        elif (m := re.fullmatch(r"layers\.(\d+)\.(gamma_attn|gamma_ffn)", key)) is not None:
            out[f"{BLOCKS}.{m[1]}.{GAMMAS[m[2]]}"] = tensor
        elif key == "embed.text.pos" and config.relative_positions:
            # Their BERT embedding adds no position table when the bias is relative: kept aside.
            out[EXTRA + key] = tensor
            report.notes.append(f"{key}: the authors' text embedding adds no positions with a relative bias; kept as {EXTRA}{key}")
        elif key in GLOBAL:
            theirs, lead = GLOBAL[key]
            out[theirs] = tensor.squeeze(0) if lead else tensor
        elif key == TOKEN_TYPES[0]:
            out[TOKEN_TYPES[1]] = tensor[[1, 0]]
        elif key in BIAS_PARTS:
            continue  # written whole below
        else:
            out[EXTRA + key] = tensor
            report.notes.append(f"{key}: no counterpart in the authors' layout, kept as {EXTRA}{key}")
        report.mapped += 1
    if BIAS_PARTS[0] in state:
        out[BIAS_TABLE] = _whole_table(state, config, report)
        out.update(index_buffers(config.grid, config.max_text_len))
    if not config.layer_scale:
        for layer in range(config.depth):
            for name in GAMMAS.values():
                out[f"{BLOCKS}.{layer}.{name}"] = torch.ones(config.dim)
        report.notes.append("no layer scale: gamma_1/gamma_2 written as ones (the identity)")
    report.notes.append(
        "fused [CLS]: vlcluster pools the image [CLS] (image first), the authors' code the text [CLS] "
        "(text first); pooler/itm/vqa heads transfer only approximately"
    )
    return out


def _whole_table(state: Mapping[str, Tensor], config: ModelConfig, report: ConversionReport) -> Tensor:
    table = torch.cat([state[key] for key in BIAS_PARTS])
    report.notes.append(
        f"relative position bias written as one table for max_text_len_of_initckpt = {config.max_text_len} "
        "(set it so in the authors' config)"
    )
    if config.relative_bias == "shared":  # their code reads a table per layer: the same one for each (the same scores)
        table = table.repeat(1, config.depth)
        report.notes.append("shared relative position bias written once per layer")
    return table


def index_buffers(grid: int, max_text_len: int) -> dict[str, Tensor]:
    """The index buffers vl-merging saves beside the table (text first in the fused one); they also
    tell an importer the grid and text length the table was written for."""
    image_length = grid * grid + 1
    fused = posbias.fused_index(grid, max_text_len, max_text_len)
    text_first = torch.cat([torch.arange(image_length, image_length + max_text_len), torch.arange(image_length)])
    return {
        "relative_position_index": posbias.image_index(grid),
        "text_relative_position_index": posbias.text_index(max_text_len, max_text_len) + posbias.image_rows(grid) + 2,
        "text_imag_relative_position_index": fused[text_first][:, text_first],
    }


def _export_layer_tensor(parsed: tuple[int, str, str, str], tensor: Tensor, out: dict[str, Tensor]) -> None:
    layer, part, expert, rest = parsed
    if (part, rest) == ("attn", "qkv.bias"):
        q, k, v = tensor.chunk(3)
        out[_block_name(layer, part, expert, "q_bias")] = q.clone()
        out[_block_name(layer, part, expert, "v_bias")] = v.clone()
        out[EXTRA + layer_key(layer, part, expert, "qkv.k_bias")] = k.clone()
    else:
        out[_block_name(layer, part, expert, rest)] = tensor


# --- authors -> vlcluster -------------------------------------------------------


def import_state(source: Mapping[str, Tensor], report: ConversionReport) -> dict[str, Tensor]:
    """The authors' state dict in vlcluster names (experts as the source has them)."""
    out: dict[str, Tensor] = {}
    attn_bias: dict[tuple[int, str], dict[str, Tensor]] = {}
    relative = BIAS_TABLE in source
    folded = _fold_text_norm(source, out, report) if relative else set()
    for raw_key, tensor in source.items():
        key = _dealias(raw_key)
        if key in folded:
            pass  # in the word table already
        elif relative and key == TEXT_POSITIONS:
            report.drop(raw_key, "BERT position table: unused by the source (relative positions add none)")
            continue
        elif key == BIAS_TABLE:
            out[WHOLE_TABLE] = tensor
        elif key == TOKEN_TYPES[1]:
            out[TOKEN_TYPES[0]] = tensor[[1, 0]]  # (an NLVR2 model's third row, its second image, has no place)
        elif key.startswith(EXTRA):
            _import_extra(key[len(EXTRA):], tensor, out, attn_bias)
        elif (m := _BLOCK.match(key)) is not None and not _dropped(key):
            _import_block_tensor(m, tensor, out, attn_bias)
        elif (m := _GAMMA.match(key)) is not None:
            out[f"layers.{m[1]}.{_GAMMA_BY_NAME[m[2]]}"] = tensor
        elif key in GLOBAL_BY_AUTHORS:
            ours, lead = GLOBAL_BY_AUTHORS[key]
            out[ours] = tensor.unsqueeze(0) if lead else tensor
        else:
            report.drop(raw_key, _drop_reason(key))
            continue
        report.mapped += 1
    _assemble_qkv_bias(attn_bias, out, report)
    return out


def _fold_text_norm(source: Mapping[str, Tensor], out: dict[str, Tensor], report: ConversionReport) -> set[str]:
    """LayerNorm(word + token type 0) as the word table; the source keys it used (none if one is missing)."""
    pieces = ("text_embeddings.word_embeddings.weight", TEXT_TYPES, f"{TEXT_NORM}.weight", f"{TEXT_NORM}.bias")
    if not all(key in source for key in pieces):
        return set()
    word, types, weight, bias = (source[key].double() for key in pieces)
    eps = 1e-12  # BertConfig's layer_norm_eps, which the authors' text embedding keeps
    folded = F.layer_norm(word + types[0], (word.shape[1],), weight, bias, eps)
    out["embed.text.word.weight"] = folded.to(source[pieces[0]].dtype)
    report.notes.append(
        "text embedding: LayerNorm(word + token type 0) folded into the word table (with relative "
        "positions BERT adds no position table, so this is the source's function)"
    )
    return set(pieces)


def _dealias(key: str) -> str:
    for old, new in ALIASES.items():
        key = key.replace(old, new)
    return key


def _dropped(key: str) -> bool:
    return any(re.search(pattern, key) for pattern, _ in DROP_REASONS)


def _drop_reason(key: str) -> str:
    return next((reason for pattern, reason in DROP_REASONS if re.search(pattern, key)), "no counterpart in vlcluster")


def _import_block_tensor(m: re.Match, tensor: Tensor, out: dict[str, Tensor], attn_bias: dict) -> None:
    layer, part, expert, rest = int(m[1]), _PART_BY_NAME[m[2]], m[3] or SHARED, m[4]
    if part == "attn" and rest in ("q_bias", "v_bias"):
        attn_bias.setdefault((layer, expert), {})[rest] = tensor
    else:
        out[layer_key(layer, part, expert, rest)] = tensor


def _import_extra(key: str, tensor: Tensor, out: dict[str, Tensor], attn_bias: dict) -> None:
    parsed = parse_layer_key(key)
    if parsed is not None and parsed[1] == "attn" and parsed[3] == "qkv.k_bias":
        attn_bias.setdefault((parsed[0], parsed[2]), {})["k_bias"] = tensor
    else:
        out[key] = tensor


def _assemble_qkv_bias(attn_bias: dict, out: dict[str, Tensor], report: ConversionReport) -> None:
    """vlcluster's fused qkv bias from q_bias, (k_bias or zeros), v_bias; attention without
    biases (qkv_bias=False in the source) gets zeros."""
    without_key_bias = 0
    for key in [k for k in out if k.endswith(".qkv.weight")]:
        if key.replace(".weight", ".bias") in out:  # one bias for q, k and v (timm's ViT)
            continue
        layer, part, expert, _ = parse_layer_key(key)
        parts = attn_bias.get((layer, expert), {})
        dim = out[key].shape[1]
        zeros = out[key].new_zeros(dim)
        if "k_bias" not in parts:
            without_key_bias += 1
        out[layer_key(layer, part, expert, "qkv.bias")] = torch.cat(
            [parts.get("q_bias", zeros), parts.get("k_bias", zeros), parts.get("v_bias", zeros)]
        )
    if without_key_bias:
        report.notes.append(
            f"{without_key_bias} attention experts have no key bias in the source: set to zero "
            "(a key bias never changes attention weights)"
        )


def position_structure(source: Mapping[str, Tensor]) -> dict[str, Any]:
    """``position`` (and heads, which the per-layer bias table's width gives) from the tensor names."""
    if BIAS_TABLE not in source:
        return {"position": "absolute"}
    depth = len({int(m[1]) for key in source if (m := re.match(r"^transformer\.blocks\.(\d+)\.", key))})
    structure: dict[str, Any] = {
        "position": "both" if "transformer.pos_embed" in source else "relative", "relative_bias": "per_layer",
    }
    if depth and source[BIAS_TABLE].shape[1] % depth == 0:
        structure["heads"] = source[BIAS_TABLE].shape[1] // depth
    # Without absolute tables only the index buffers (vl-merging saves them) tell the grid and text length.
    patch = source.get("transformer.patch_embed.proj.weight")
    if "relative_position_index" in source and patch is not None:
        structure["image_size"] = math.isqrt(source["relative_position_index"].shape[0] - 1) * patch.shape[-1]
    if "text_relative_position_index" in source:
        structure["max_text_len"] = source["text_relative_position_index"].shape[0]
    return structure


def split_table(table: Tensor, grid: int, max_text_len: int, source: str) -> dict[str, Tensor]:
    """The authors' whole table as vlcluster's three, for a model of this grid and text length.

    Their text rows cover ``max_text_len_of_initckpt`` (T0) distances; a model
    with T <= T0 keeps distances -(T-2)..T-2 and the three [CLS] rows."""
    image = posbias.image_rows(grid)
    text0 = table.shape[0] - image - 2
    if text0 <= 0 or text0 % 2 or text0 // 2 < max_text_len:
        raise CheckpointError(
            f"{source}: relative_position_bias_table has {table.shape[0]} rows, which does not fit a {grid}x{grid} "
            f"patch grid ({image} image rows + 2) with text rows for at least max_text_len {max_text_len}; "
            "is model.image_size the checkpoint's?"
        )
    t0, t = text0 // 2, max_text_len
    text = table[image + 2 :]
    distances = text[t0 - t : t0 + t - 3]  # row d + T0 - 2 there is row d + T - 2 here
    return {
        BIAS_PARTS[0]: table[:image].clone(),
        BIAS_PARTS[1]: table[image : image + 2].clone(),
        BIAS_PARTS[2]: torch.cat([distances, text[-posbias.CLS_ROWS :]]),
    }
