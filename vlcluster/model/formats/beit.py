"""BEiT checkpoints: the layout `transformers` writes (``BeitModel.save_pretrained``)
and timm's. BEiT is vision-only and has one weight per block part, so it
becomes a modality-agnostic (``shared``) state dict; loading it into a
model with experts copies each shared weight into every expert, like the
seed -> VL rule. Text embeddings have no source and stay fresh.

`transformers` stores q/k/v as three linears, the key without a bias,
layer scale as ``lambda_1/lambda_2`` and, for mean-pooling models, the final
norm as ``pooler.layernorm``. timm's layout is the authors' VLMo layout of
one agnostic block stack without the ``transformer.`` prefix, so it is read
through that module.

Relative position bias tables (one per layer, or one shared) become
``position_bias.image`` with the layers' tables side by side (posbias.py);
BEiT's row order is vlcluster's. A BEiT with both a shared and per-layer
tables gets their sums per layer (the same scores). A supervised ViT written
by `transformers` (``ViTModel``) has this layout too, with a key bias and no
layer scale, so it is read here as well.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..config import SHARED, ModelConfig
from ..convert import layer_key
from ..multiway import IMAGE_TYPE
from . import vlmo
from .conversion import CheckpointError, ConversionReport

WRAPPERS = ("beit.",)  # BeitForMaskedImageModeling / BeitForImageClassification nest the encoder here

# Within encoder.layer.{i}: transformers name -> (vlcluster part, rest).
LAYER: dict[str, tuple[str, str]] = {
    "attention.output.dense.weight": ("attn", "proj.weight"),
    "attention.output.dense.bias": ("attn", "proj.bias"),
    "layernorm_before.weight": ("ln1", "weight"),
    "layernorm_before.bias": ("ln1", "bias"),
    "intermediate.dense.weight": ("ffn", "fc1.weight"),
    "intermediate.dense.bias": ("ffn", "fc1.bias"),
    "output.dense.weight": ("ffn", "fc2.weight"),
    "output.dense.bias": ("ffn", "fc2.bias"),
    "layernorm_after.weight": ("ln2", "weight"),
    "layernorm_after.bias": ("ln2", "bias"),
}
QKV = {"query": 0, "key": 1, "value": 2}  # order inside vlcluster's fused qkv
GAMMAS = {"lambda_1": "gamma_attn", "lambda_2": "gamma_ffn"}
GLOBAL = {
    "embeddings.cls_token": "embed.image.cls",
    "embeddings.patch_embeddings.projection.weight": "embed.image.patch.weight",
    "embeddings.patch_embeddings.projection.bias": "embed.image.patch.bias",
    "embeddings.position_embeddings": "embed.image.pos",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# A mean-pooling BEiT has no final norm on the sequence; its pooler's norm is the closest.
FINAL_NORM_FALLBACK = {"pooler.layernorm.weight": "norm.weight", "pooler.layernorm.bias": "norm.bias"}

DROP_REASONS: list[tuple[str, str]] = [
    (r"relative_position_index$", "buffer: the relative position index is recomputed"),
    (r"mask_token$", "masked-image-modelling token: no counterpart"),
    (r"^lm_head\.", "BEiT's masked-image-modelling head: no counterpart"),
    (r"^classifier\.", "image-classification head: no counterpart"),
    (r"^pooler\.", "mean-pooling / ViT pooler head: vlcluster pools the [CLS] token"),
]
# Relative position bias tables: per layer, or one for all layers.
_LAYER_TABLE = re.compile(
    r"^(?:encoder\.layer\.(\d+)\.attention\.attention\.relative_position_bias"
    r"|blocks\.(\d+)\.attn)\.relative_position_bias_table$"
)
SHARED_TABLES = ("encoder.relative_position_bias.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table")
IMAGE_BIAS = "position_bias.image"

_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_QKV_KEY = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")


def import_state(source: Mapping[str, Tensor], report: ConversionReport) -> dict[str, Tensor]:
    source = _unwrapped(source)
    tables = _bias_tables(source, report)
    source = {key: tensor for key, tensor in source.items() if not key.endswith("relative_position_bias_table")}
    if any(key.startswith("encoder.layer.") for key in source):
        return {**_import_transformers(source, report), **tables}
    if any(key.startswith("blocks.") for key in source):
        report.notes.append("timm BEiT layout")
        return {**_import_timm(source, report), **tables}
    raise CheckpointError(
        "not a BEiT checkpoint: expected the keys `transformers` writes (encoder.layer.N.…) or timm's (blocks.N.…); "
        f"found e.g. {sorted(source)[:3]}"
    )


def position_structure(source: Mapping[str, Tensor]) -> dict[str, Any]:
    """``position`` and ``relative_bias`` of a BEiT (or ViT) from its tensor names."""
    source = _unwrapped(source)
    absolute = any(key in source for key in ("embeddings.position_embeddings", "pos_embed"))
    per_layer = any(_LAYER_TABLE.match(key) for key in source)
    shared = any(key in source for key in SHARED_TABLES)
    if not (per_layer or shared):
        return {"position": "absolute"}
    return {"position": "both" if absolute else "relative", "relative_bias": "per_layer" if per_layer else "shared"}


def _bias_tables(source: Mapping[str, Tensor], report: ConversionReport) -> dict[str, Tensor]:
    """``position_bias.image`` from the per-layer tables (side by side) or the shared one."""
    layers = {int(m[1] or m[2]): tensor for key, tensor in source.items() if (m := _LAYER_TABLE.match(key))}
    shared = next((source[key] for key in SHARED_TABLES if key in source), None)
    report.mapped += len(layers) + (shared is not None)
    if not layers:
        return {} if shared is None else {IMAGE_BIAS: shared}
    if sorted(layers) != list(range(len(layers))):
        raise CheckpointError(f"relative position bias tables of layers {sorted(layers)}: expected one for every layer")
    tables = [layers[i] for i in range(len(layers))]
    if shared is not None:  # both kinds add to the same scores: their sums are one table per layer
        tables = [table + shared for table in tables]
        report.notes.append("shared and per-layer relative position bias tables summed per layer (the same scores)")
    return {IMAGE_BIAS: torch.cat(tables, dim=1)}


def structure_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields from a `transformers` BeitConfig or ViTConfig (config.json)."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {config['hidden_act']!r}: vlcluster's FFN uses exact GELU only")
    dim = config["hidden_size"]
    structure = {
        "dim": dim,
        "heads": config["num_attention_heads"],
        "depth": config["num_hidden_layers"],
        "mlp_ratio": config["intermediate_size"] / dim,
        "image_size": config["image_size"],
        "patch_size": config["patch_size"],
        "layer_norm_eps": config["layer_norm_eps"],
    }
    if config.get("layer_scale_init_value", 0) > 0:
        structure["layer_scale"] = config["layer_scale_init_value"]
    return structure


def _unwrapped(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in source.items():
        for prefix in WRAPPERS:
            key = key.removeprefix(prefix)
        out[key] = tensor
    return out


def _import_transformers(source: Mapping[str, Tensor], report: ConversionReport) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    qkv: dict[int, dict[tuple[str, str], Tensor]] = {}
    used: set[str] = set()
    for key, tensor in source.items():
        if (target := _target_of(key)) is not None:
            out[target] = tensor
        elif (q := _qkv_piece(key)) is not None:
            qkv.setdefault(q[0], {})[q[1:]] = tensor
        else:
            continue
        used.add(key)
    for layer, pieces in qkv.items():
        out.update(_fused_qkv(layer, pieces))
    used |= _final_norm(source, out, report)
    report.mapped += len(used)
    for key in source.keys() - used:
        report.drop(key, _drop_reason(key))
    return out


def _target_of(key: str) -> str | None:
    """vlcluster key of a tensor mapped one to one."""
    if key in GLOBAL:
        return GLOBAL[key]
    m = _LAYER_KEY.match(key)
    if m is None:
        return None
    layer, rest = int(m[1]), m[2]
    if rest in LAYER:
        part, name = LAYER[rest]
        return layer_key(layer, part, SHARED, name)
    if rest in GAMMAS:
        return f"layers.{layer}.{GAMMAS[rest]}"
    return None


def _qkv_piece(key: str) -> tuple[int, str, str] | None:
    """(layer, query|key|value, weight|bias) of a separate q/k/v tensor."""
    m = _LAYER_KEY.match(key)
    q = None if m is None else _QKV_KEY.match(m[2])
    return None if q is None else (int(m[1]), q[1], q[2])


def _fused_qkv(layer: int, pieces: dict[tuple[str, str], Tensor]) -> dict[str, Tensor]:
    missing = [f"{name}.weight" for name in QKV if (name, "weight") not in pieces]
    if missing:
        raise CheckpointError(f"encoder.layer.{layer}.attention.attention: missing {missing}")
    weight = torch.cat([pieces[(name, "weight")] for name in QKV])
    zeros = weight.new_zeros(weight.shape[1])
    bias = torch.cat([pieces.get((name, "bias"), zeros) for name in QKV])  # BEiT's key has no bias
    return {layer_key(layer, "attn", SHARED, "qkv.weight"): weight, layer_key(layer, "attn", SHARED, "qkv.bias"): bias}


def _final_norm(source: Mapping[str, Tensor], out: dict[str, Tensor], report: ConversionReport) -> set[str]:
    """Use the pooler's norm as the final norm when the model has none; the source keys used."""
    if "norm.weight" in out or not all(key in source for key in FINAL_NORM_FALLBACK):
        return set()
    for theirs, ours in FINAL_NORM_FALLBACK.items():
        out[ours] = source[theirs]
    report.notes.append("final norm taken from pooler.layernorm (a mean-pooling BEiT normalises only the pooled patches)")
    return set(FINAL_NORM_FALLBACK)


def _drop_reason(key: str) -> str:
    return next((reason for pattern, reason in DROP_REASONS if re.search(pattern, key)), "no counterpart in vlcluster")


def _import_timm(source: Mapping[str, Tensor], report: ConversionReport) -> dict[str, Tensor]:
    renamed = {f"transformer.{key}": tensor for key, tensor in source.items()}
    if "norm.weight" not in source and "fc_norm.weight" in source:
        renamed["transformer.norm.weight"] = renamed.pop("transformer.fc_norm.weight")
        renamed["transformer.norm.bias"] = renamed.pop("transformer.fc_norm.bias")
        report.notes.append("final norm taken from fc_norm (a mean-pooling BEiT normalises only the pooled patches)")
    sub = vlmo.import_state(renamed, report)
    # Report dropped keys by their timm names.
    report.dropped = {key.removeprefix("transformer."): reason for key, reason in report.dropped.items()}
    return sub


# --- vlcluster -> transformers BEiT (the image route) ------------------------------------


def export_state(state: Mapping[str, Tensor], config: ModelConfig, report: ConversionReport) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The image route of a vlcluster model as a `transformers` BeitModel: its tensors and config.json.

    Each block part takes the "v" expert (or the shared weight). The image token
    type is folded into the [CLS] token and the patch projection's bias (BEiT
    has no token types; every image token gets it either way). The key bias is
    left out: BEiT has none, and it moves every score of a query alike."""
    out: dict[str, Tensor] = {}
    image_type = state["embed.token_type.weight"][IMAGE_TYPE]
    ours_to_theirs = {ours: theirs for theirs, ours in GLOBAL.items()}
    for ours, theirs in ours_to_theirs.items():
        if ours in state:
            out[theirs] = state[ours]
    out["embeddings.cls_token"] = state["embed.image.cls"] + image_type
    out["embeddings.patch_embeddings.projection.bias"] = state["embed.image.patch.bias"] + image_type
    for layer in range(config.depth):
        out.update(_export_layer(state, layer, config))
    if config.relative_positions:
        out.update(_export_bias(state["position_bias.image"], config))
    report.mapped = len(out)
    report.notes.append("image route only: the 'v' experts (or shared weights); text, fusion and heads are not written")
    report.notes.append("image token type folded into the [CLS] token and the patch projection bias; key bias left out (no effect on attention)")
    return out, _beit_config(config)


def _export_layer(state: Mapping[str, Tensor], layer: int, config: ModelConfig) -> dict[str, Tensor]:
    def ours(part: str, rest: str) -> Tensor:
        key = layer_key(layer, part, "v", rest)
        return state[key if key in state else layer_key(layer, part, SHARED, rest)]

    prefix = f"encoder.layer.{layer}."
    out = {prefix + theirs: ours(part, rest) for theirs, (part, rest) in LAYER.items()}
    weight, bias = ours("attn", "qkv.weight").chunk(3), ours("attn", "qkv.bias").chunk(3)
    for name, index in QKV.items():
        out[f"{prefix}attention.attention.{name}.weight"] = weight[index]
        if name != "key":
            out[f"{prefix}attention.attention.{name}.bias"] = bias[index]
    if config.layer_scale:
        for theirs, gamma in GAMMAS.items():
            out[prefix + theirs] = state[f"layers.{layer}.{gamma}"]
    return out


def _export_bias(table: Tensor, config: ModelConfig) -> dict[str, Tensor]:
    if config.relative_bias == "shared":
        return {SHARED_TABLES[0]: table}
    return {
        f"encoder.layer.{layer}.attention.attention.relative_position_bias.relative_position_bias_table": columns
        for layer, columns in enumerate(table.split(config.heads, dim=1))
    }


def _beit_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "beit",
        "architectures": ["BeitModel"],
        "hidden_size": config.dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu",
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": 3,
        "layer_norm_eps": config.layer_norm_eps,
        "layer_scale_init_value": config.layer_scale,
        "use_absolute_position_embeddings": config.absolute_positions,
        "use_relative_position_bias": config.relative_positions and config.relative_bias == "per_layer",
        "use_shared_relative_position_bias": config.relative_positions and config.relative_bias == "shared",
        "use_mean_pooling": False,  # vlcluster normalises every token and pools [CLS]
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
    }
