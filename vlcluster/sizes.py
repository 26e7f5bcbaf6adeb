"""Model size presets, architectures, checkpoint formats and the rules a model's structure must satisfy.

Torch-free on purpose: the job-spec loader checks `model:` overrides with
the same rules `ModelConfig` enforces, without importing the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        dim=128, depth=4, heads=4, vl_layers=1, image_size=32, patch_size=8, mlp_ratio=4.0,
        itc_dim=128, vocab_size=64, max_text_len=32, num_answers=15,
    ),
    # ViT-Tiny/16 (the paper's Table 4): ViT-B/16's depth and resolution at d=192, 3 heads.
    "vit_tiny": dict(
        dim=192, depth=12, heads=3, vl_layers=2, image_size=224, patch_size=16, mlp_ratio=4.0,
        itc_dim=192, vocab_size=30522, max_text_len=40, num_answers=3129,
    ),
    # ViT-B/16 with the bert-base-uncased vocabulary and VQA v2 answers (paper setting);
    # positions as VLMo-base: a relative position bias per layer, no absolute tables.
    "base": dict(
        dim=768, depth=12, heads=12, vl_layers=2, image_size=224, patch_size=16, mlp_ratio=4.0,
        itc_dim=768, vocab_size=30522, max_text_len=40, num_answers=3129, position="relative",
    ),
}
SIZES = tuple(PRESETS)

# The parts of a block, and per architecture the parts that keep one expert per
# modality (every other part is one shared weight): the arch -> expert layout
# rule that model/config.py's experts_for applies.
PARTS = ("attn", "ffn", "ln1", "ln2")
CUSTOM_PARTS: dict[str, frozenset[str]] = {
    "specific": frozenset(PARTS),
    "agnostic": frozenset(),
    "custom_attn": frozenset({"attn"}),
    "custom_ffn": frozenset({"ffn"}),
    "custom_ln": frozenset({"ln1", "ln2"}),
}
ARCHS = tuple(CUSTOM_PARTS)

# Checkpoint layouts a model is read from (model/external.py converts them): BEiT and
# ViT (transformers or timm), the authors' VLMo code, and vlcluster's own.
CHECKPOINT_FORMATS = ("beit", "vit", "vlmo", "vlcluster")

# Fields a job spec's `model:` may set on top of a size preset.
STRUCTURE_FIELDS = (
    "dim", "depth", "heads", "vl_layers", "patch_size", "image_size", "mlp_ratio", "max_text_len", "layer_scale",
    "position", "relative_bias",
)
# How tokens know where they are: absolute tables added to the embeddings, a
# relative bias added to the attention scores (BEiT, VLMo), or both (some BEiTs).
POSITIONS = ("absolute", "relative", "both")
# A relative bias table per layer (VLMo, most BEiTs) or one for all layers (BEiT's shared option).
RELATIVE_BIASES = ("per_layer", "shared")


def structure_errors(fields: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, problem) for every rule the given structure breaks; fields absent are not checked."""
    get = fields.get
    errors: list[tuple[str, str]] = []
    for name in ("dim", "depth", "heads", "patch_size", "image_size", "mlp_ratio"):
        if get(name) is not None and get(name) <= 0:
            errors.append((name, f"must be positive, got {get(name)}"))
    if errors:
        return errors
    if get("dim") and get("heads") and get("dim") % get("heads"):
        errors.append(("heads", f"dim {get('dim')} is not divisible by heads {get('heads')}"))
    if get("vl_layers") is not None and get("depth") and not 0 <= get("vl_layers") <= get("depth"):
        errors.append(("vl_layers", f"must be in [0, depth={get('depth')}], got {get('vl_layers')}"))
    if get("image_size") and get("patch_size") and get("image_size") % get("patch_size"):
        errors.append(("patch_size", f"image_size {get('image_size')} is not a multiple of patch_size {get('patch_size')}"))
    if get("position") is not None and get("position") not in POSITIONS:
        errors.append(("position", f"must be one of {POSITIONS}, got {str(get('position'))[:40]!r}"))
    if get("position") in ("relative", "both") and get("max_text_len") is not None and get("max_text_len") < 2:
        errors.append(("max_text_len", "a relative position bias needs max_text_len >= 2 ([CLS] and a token)"))
    if get("relative_bias") is not None and get("relative_bias") not in RELATIVE_BIASES:
        errors.append(("relative_bias", f"must be one of {RELATIVE_BIASES}, got {str(get('relative_bias'))[:40]!r}"))
    if get("layer_scale") is not None and get("layer_scale") < 0:
        errors.append(("layer_scale", f"must be >= 0 (0 = no layer scale), got {get('layer_scale')}"))
    return errors


def check_structure(size: str, overrides: Mapping[str, Any], image_size_known: bool = True) -> None:
    """Raise ValueError naming the field when `size` plus `overrides` is not a valid model.

    With ``image_size_known=False`` the resolution is left to the data (a
    training stage reading a data stage), so divisibility by the patch is
    checked at training time instead."""
    if size not in PRESETS:
        raise ValueError(f"unknown model size {size!r}; expected one of {SIZES}")
    fields = {**PRESETS[size], **overrides}
    if not image_size_known:
        fields.pop("image_size")
    if errors := structure_errors(fields):
        raise ValueError("; ".join(f"model.{name}: {problem}" for name, problem in errors))


class DerivedShape:
    """What follows from a model's fields (depth, vl_layers, image and patch size, dim, mlp_ratio):
    shared by ``ModelConfig`` and the torch-free shape ``plan`` estimates with."""

    depth: int
    vl_layers: int
    image_size: int
    patch_size: int
    dim: int
    mlp_ratio: float

    @property
    def bottom_layers(self) -> int:
        return self.depth - self.vl_layers

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def mlp_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)
