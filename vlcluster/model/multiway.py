"""Multiway (VLMo-style) transformer with per-part modality experts.

Every block part (attn, ffn, ln1, ln2) is a `Multiway`: a ModuleDict keyed by
expert ("v", "l", "vl" or "shared"), so parameters are named
``layers.{i}.{part}.{expert}.…`` and merging can group experts by name.
A modality with no expert of its own falls back to "shared". With
``layer_scale`` a block also has ``layers.{i}.gamma_attn`` / ``gamma_ffn``,
shared by its experts and never merged. With ``position: relative`` (or
``both``) the attention scores get a relative position bias (posbias.py,
``position_bias.*``), one table for the whole model, also outside the experts.

Public routes (N = depth, M = vl_layers, B = N - M bottom layers):

- ``embed_image(images)`` / ``embed_text(ids)``: token embeddings.
- ``run_layers(x, modality, start, end, mask)``: layers[start:end] with one expert.
- ``bottom_image(images)`` / ``bottom_text(ids, mask)``: first B layers, "v" / "l".
- ``finish(x, modality, mask)``: layers B..N with the same unimodal expert + final norm.
- ``encode_image(images)`` / ``encode_text(ids, mask)``: retrieval (ITC) route,
  all N layers with "v" / "l", then the final norm. [CLS] is position 0.
- ``fuse(img_bottom, txt_bottom, txt_mask)``: concat [image; text] bottom outputs,
  top M layers with "vl", final norm.
- ``fusion(images, ids, mask)``: classification route (ITM/MLM/VQA) = bottom_* then
  fuse; image and text never attend to each other below layer B. The fused
  [CLS] is position 0 (the image [CLS]).

Training computes bottom_* once and feeds it to both ``finish`` (ITC) and ``fuse``.
Text masks are key-padding masks [B, L], True (or 1) = real token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MODALITIES, PARTS, SHARED, ModelConfig, experts_for
from .heads import build_heads
from .posbias import RelativePositionBias

IMAGE_TYPE, TEXT_TYPE = 0, 1
INIT_STD = 0.02


def trunc_normal_(t: Tensor) -> Tensor:
    # Cut at 2 sigma (torch's default cut is +-2 absolute, i.e. no truncation at this std).
    return nn.init.trunc_normal_(t, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)


class Multiway(nn.ModuleDict):
    """One block part with an expert per modality (or a single shared one)."""

    def __init__(self, experts: Sequence[str], factory: Callable[[], nn.Module]):
        super().__init__({e: factory() for e in experts})

    def route(self, modality: str) -> nn.Module:
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        if modality in self:
            return self[modality]
        if SHARED in self:
            return self[SHARED]
        raise KeyError(
            f"no {modality!r} expert and no shared weight in this part (experts: {list(self.keys())}); "
            f"is {modality!r} being routed through a layer below the top vl_layers?"
        )

    def forward(self, x: Tensor, modality: str, *args, **kwargs) -> Tensor:
        return self.route(modality)(x, *args, **kwargs)

    @torch.no_grad()
    def copy_first_expert(self) -> None:
        """Give every expert the first one's weights: all experts of a
        modality-specific model start from one initialisation (paper §3), the
        same rule that turns a seed checkpoint into experts."""
        first, *others = self.values()
        for expert in others:
            expert.load_state_dict(first.state_dict())


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """``mask``: key padding [B, L], True = real token; ``bias``: [heads, L, L] added to the scores."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # Key-padding mask broadcast over heads and queries; None keeps the fused kernels eligible.
        attn_mask = None if mask is None else mask[:, None, None, :]
        if bias is not None:
            attn_mask = bias[None].to(q.dtype)
            if mask is not None:
                attn_mask = attn_mask.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MultiwayBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        def norm() -> nn.Module:
            return nn.LayerNorm(config.dim, eps=config.layer_norm_eps)

        factories: dict[str, Callable[[], nn.Module]] = {
            "attn": lambda: Attention(config.dim, config.heads),
            "ffn": lambda: FeedForward(config.dim, config.mlp_dim),
            "ln1": norm,
            "ln2": norm,
        }
        for part in PARTS:
            self.add_module(part, Multiway(experts_for(config, layer, part), factories[part]))
        # Layer scale (BEiT, VLMo): one per-channel gamma per residual branch, shared by all
        # experts of the block. Outside the parts, so merging copies it like the authors' code.
        self.layer_scale = config.layer_scale
        if self.layer_scale:
            self.gamma_attn = nn.Parameter(torch.empty(config.dim))
            self.gamma_ffn = nn.Parameter(torch.empty(config.dim))

    def init_weights(self) -> None:
        if self.layer_scale:
            nn.init.constant_(self.gamma_attn, self.layer_scale)
            nn.init.constant_(self.gamma_ffn, self.layer_scale)

    def forward(self, x: Tensor, modality: str, mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        attn = self.attn(self.ln1(x, modality), modality, mask, bias)
        x = x + (self.gamma_attn * attn if self.layer_scale else attn)
        ffn = self.ffn(self.ln2(x, modality), modality)
        return x + (self.gamma_ffn * ffn if self.layer_scale else ffn)


class ImageEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.image_size = config.image_size
        self.patch = nn.Conv2d(3, config.dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.empty(1, 1, config.dim))
        # Only with absolute positions: a model with relative ones has no table at all.
        if config.absolute_positions:
            self.pos = nn.Parameter(torch.empty(1, config.num_patches + 1, config.dim))

    def init_weights(self) -> None:
        trunc_normal_(self.cls)
        if hasattr(self, "pos"):
            trunc_normal_(self.pos)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}px images, got {tuple(images.shape)}")
        x = self.patch(images).flatten(2).transpose(1, 2)  # [B, P, D]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos if hasattr(self, "pos") else x


class TextEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.dim)
        self.max_text_len = config.max_text_len
        if config.absolute_positions:
            self.pos = nn.Parameter(torch.empty(1, config.max_text_len, config.dim))

    def init_weights(self) -> None:
        if hasattr(self, "pos"):
            trunc_normal_(self.pos)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.max_text_len:
            raise ValueError(f"text length {ids.shape[1]} exceeds max_text_len {self.max_text_len}")
        x = self.word(ids)
        return x + self.pos[:, : ids.shape[1]] if hasattr(self, "pos") else x


def _init_module(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
        trunc_normal_(m.weight)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif hasattr(m, "init_weights"):  # our modules with raw Parameters (cls/pos tables, logit scale)
        m.init_weights()


class MultiwayTransformer(nn.Module):
    def __init__(self, config: ModelConfig, heads: Sequence[str] = ("itc", "itm", "mlm", "vqa")):
        super().__init__()
        self.config = config
        # "token_type", not "type": nn.Module.type() would shadow a submodule of that name.
        self.embed = nn.ModuleDict({
            "image": ImageEmbedding(config),
            "text": TextEmbedding(config),
            "token_type": nn.Embedding(2, config.dim),  # 0 = image, 1 = text
        })
        self.layers = nn.ModuleList(MultiwayBlock(config, i) for i in range(config.depth))
        if config.relative_positions:
            self.position_bias = RelativePositionBias(config)
        self.norm = nn.LayerNorm(config.dim, eps=config.layer_norm_eps)
        self.heads = build_heads(config, heads)
        # Meta-device models (FSDP / checkpoint loading) are initialised after materialisation.
        if not self.norm.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if m is not self:
                _init_module(m)
        # Experts that start apart sit in different basins and merge badly, which
        # would overstate the merging baseline's (K_seed = 0) drop.
        for m in self.modules():
            if isinstance(m, Multiway):
                m.copy_first_expert()

    @torch.no_grad()
    def init_modules_of(self, keys: Iterable[str]) -> None:
        """Initialise only the modules owning `keys`, e.g. the parts a checkpoint
        did not fill after the rest was loaded into an empty (``to_empty``) model."""
        keys = set(keys)
        for owner in sorted({key.rsplit(".", 1)[0] for key in keys}):
            module = self.get_submodule(owner)
            # A module's init covers all its own tensors; keep the loaded ones (e.g. the
            # image bias table of a BEiT beside fresh text tables).
            loaded = {name: t.detach().clone() for name, t in module.named_parameters(recurse=False) if f"{owner}.{name}" not in keys}
            _init_module(module)
            for name, tensor in loaded.items():
                getattr(module, name).copy_(tensor)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        return sum(
            p.numel()
            for n, p in self.named_parameters()
            if not (exclude_embeddings and n.startswith("embed."))
        )

    # --- embeddings -------------------------------------------------------

    def _type(self, x: Tensor, type_id: int) -> Tensor:
        return x + self.embed["token_type"].weight[type_id]

    def embed_image(self, images: Tensor) -> Tensor:
        return self._type(self.embed["image"](images), IMAGE_TYPE)

    def embed_text(self, ids: Tensor) -> Tensor:
        return self._type(self.embed["text"](ids), TEXT_TYPE)

    # --- routes -----------------------------------------------------------

    def run_layers(
        self, x: Tensor, modality: str, start: int, end: int, mask: Tensor | None = None
    ) -> Tensor:
        mask = None if mask is None else mask.bool()
        # One lookup per route for all layers (the sequence layout follows from
        # the modality and length: "vl" is [image; text]), then a slice per layer.
        table = getattr(self, "position_bias", None)
        bias = None if table is None else table(modality, x.shape[1], start, end)
        for index in range(start, end):
            x = self.layers[index](x, modality, mask, None if bias is None else table.for_layer(bias, index - start))
        return x

    def bottom_image(self, images: Tensor) -> Tensor:
        return self.run_layers(self.embed_image(images), "v", 0, self.config.bottom_layers)

    def bottom_text(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.run_layers(self.embed_text(ids), "l", 0, self.config.bottom_layers, mask)

    def finish(self, x: Tensor, modality: str, mask: Tensor | None = None) -> Tensor:
        """Continue bottom activations through the top layers with `modality`, then the final norm."""
        return self.norm(self.run_layers(x, modality, self.config.bottom_layers, self.config.depth, mask))

    def encode_image(self, images: Tensor) -> Tensor:
        return self.finish(self.bottom_image(images), "v")

    def encode_text(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.finish(self.bottom_text(ids, mask), "l", mask)

    def fuse(self, img_bottom: Tensor, txt_bottom: Tensor, txt_mask: Tensor | None = None) -> Tensor:
        x = torch.cat([img_bottom, txt_bottom], dim=1)
        mask = None
        if txt_mask is not None:
            img_mask = txt_mask.new_ones(img_bottom.shape[:2], dtype=torch.bool)
            mask = torch.cat([img_mask, txt_mask.bool()], dim=1)
        return self.finish(x, "vl", mask)

    def fusion(self, images: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.fuse(self.bottom_image(images), self.bottom_text(ids, mask), mask)
