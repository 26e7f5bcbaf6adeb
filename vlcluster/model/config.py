"""Model configuration and the arch -> expert layout rule.

The layout rule (`experts_for`) is the single source of truth for which
expert weights exist; the model, the checkpoint converter and the merge
engine all derive parameter names from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The architectures and their parts live in the torch-free sizes.py (job files are checked against them).
from vlcluster.sizes import ARCHS, CUSTOM_PARTS, PARTS, PRESETS, SIZES, DerivedShape, structure_errors

MODALITIES = ("v", "l", "vl")
SHARED = "shared"


@dataclass(frozen=True)
class ModelConfig(DerivedShape):
    arch: str
    dim: int
    depth: int  # N: layers per modality
    heads: int
    vl_layers: int  # M: top layers that also have a vision-language expert
    image_size: int
    patch_size: int
    vocab_size: int
    max_text_len: int
    num_answers: int  # VQA classes; 0 = no VQA head
    itc_dim: int
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    # Initial value of BEiT/VLMo-style per-channel residual scales (gamma); 0 = none.
    layer_scale: float = 0.0
    # "absolute" (position tables added to the embeddings), "relative" (a bias on the
    # attention scores, as VLMo-base) or "both"; see posbias.py.
    position: str = "absolute"
    # With a relative bias: one table per layer ("per_layer") or one for all ("shared").
    relative_bias: str = "per_layer"

    def __post_init__(self) -> None:
        # A config also comes from model.json files on disk: check types and
        # ranges before any arithmetic (heads: 0 would divide by zero).
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 24):
                raise ValueError(f"{field.name} must be an integer in [0, 2^24), got {str(value)[:40]}")
            low = 0 if field.name == "layer_scale" else 1e-30  # layer_scale 0 means "no residual scales"
            if field.type == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value < 1e3):
                raise ValueError(f"{field.name} must be a number in ({low:g}, 1000), got {str(value)[:40]}")
        for name in ("dim", "depth", "heads", "image_size", "patch_size", "vocab_size", "max_text_len", "itc_dim"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be positive")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if errors := structure_errors(dataclasses.asdict(self)):
            raise ValueError("; ".join(f"{name}: {problem}" for name, problem in errors))

    @property
    def absolute_positions(self) -> bool:
        return self.position in ("absolute", "both")

    @property
    def relative_positions(self) -> bool:
        return self.position in ("relative", "both")

    @property
    def grid(self) -> int:
        """Patches per side of the (square) image."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object, not {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {sorted(map(str, unknown))[:10]}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"missing ModelConfig keys: {missing}")
        return cls(**d)

    def with_arch(self, arch: str) -> ModelConfig:
        return dataclasses.replace(self, arch=arch)


def experts_for(config: ModelConfig, layer: int, part: str) -> tuple[str, ...]:
    """Expert keys of `part` in `layer`: ("shared",) or the modality experts."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    if not 0 <= layer < config.depth:
        raise ValueError(f"layer {layer} out of range for depth {config.depth}")
    if part not in CUSTOM_PARTS[config.arch]:
        return (SHARED,)
    return ("v", "l", "vl") if layer >= config.bottom_layers else ("v", "l")


def preset(size: str, arch: str, **overrides: Any) -> ModelConfig:
    if size not in PRESETS:
        raise ValueError(f"unknown model size {size!r}; expected one of {SIZES}")
    return ModelConfig.from_dict({**PRESETS[size], "arch": arch, **overrides})
