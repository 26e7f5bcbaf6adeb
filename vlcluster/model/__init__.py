"""Multiway transformer, its configs, task heads and checkpoint conversion."""

from .config import ARCHS, MODALITIES, PARTS, SHARED, ModelConfig, experts_for, preset
from .convert import expand_to_experts, layer_key, load_into, parse_layer_key
from .heads import HEADS, build_heads
from .multiway import Multiway, MultiwayBlock, MultiwayTransformer

__all__ = [
    "ARCHS",
    "HEADS",
    "MODALITIES",
    "PARTS",
    "SHARED",
    "ModelConfig",
    "Multiway",
    "MultiwayBlock",
    "MultiwayTransformer",
    "build_heads",
    "expand_to_experts",
    "experts_for",
    "layer_key",
    "load_into",
    "parse_layer_key",
    "preset",
]
