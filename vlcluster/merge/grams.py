"""RegMean statistics of a modality-specific model (the ``grams`` stage runs them).

Forward pre-hooks on every expert's linear layers (attention ``qkv``/``proj``,
FFN ``fc1``/``fc2``) accumulate XᵀX in float64 over N batches of image-text
pairs, run through every route that uses an expert: image through all layers
with V, captions with L, and the fusion route (top layers with VL). Padding
tokens are masked out, sums and token counts are all-reduced across ranks,
and each Gram is normalised by its token count (so experts that saw
different numbers of tokens weigh equally). The Grams are keyed by the
weight each belongs to (the stage writes them to ``grams.safetensors``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from vlcluster.model import SHARED, MultiwayTransformer, load_into, parse_layer_key


class GramCollector:
    """Σ xᵀx and token counts per expert linear weight, from forward pre-hooks."""

    def __init__(self, model: MultiwayTransformer):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.mask: torch.Tensor | None = None  # real-token mask [B, L] of the route running now
        self.handles = [
            module.register_forward_pre_hook(partial(self._record, f"{name}.weight"))
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and _is_expert_linear(name)
        ]

    def _record(self, key: str, module: nn.Module, args: tuple) -> None:
        x = args[0]
        tokens = x[self.mask] if self.mask is not None else x.reshape(-1, x.shape[-1])
        tokens = tokens.detach().double()
        if key not in self.sums:
            self.sums[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
            self.counts[key] = 0
        self.sums[key].addmm_(tokens.T, tokens)
        self.counts[key] += tokens.shape[0]

    @contextmanager
    def tokens(self, mask: torch.Tensor | None) -> Iterator[None]:
        self.mask = None if mask is None else mask.bool()
        try:
            yield
        finally:
            self.mask = None

    def all_reduce(self) -> None:
        """Sum statistics over ranks. Every rank ran the same routes, so keys agree."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for key in sorted(self.sums):
            count = torch.tensor([self.counts[key]], dtype=torch.float64)
            dist.all_reduce(self.sums[key])
            dist.all_reduce(count)
            self.counts[key] = int(count.item())

    def grams(self) -> dict[str, torch.Tensor]:
        return {key: self.sums[key] / self.counts[key] for key in sorted(self.sums) if self.counts[key]}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _is_expert_linear(module_name: str) -> bool:
    parsed = parse_layer_key(f"{module_name}.weight")
    return parsed is not None and parsed[2] != SHARED


@torch.no_grad()
def run_routes(model: MultiwayTransformer, collector: GramCollector, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Every route that reaches an expert: retrieval (V, L through all layers) and fusion (VL on top)."""
    image_bottom = model.bottom_image(images)
    with collector.tokens(mask):
        text_bottom = model.bottom_text(ids, mask)
    model.finish(image_bottom, "v")
    with collector.tokens(mask):
        model.finish(text_bottom, "l", mask)
    fused_mask = torch.cat([mask.new_ones(image_bottom.shape[:2], dtype=torch.bool), mask.bool()], dim=1)
    with collector.tokens(fused_mask):
        model.fuse(image_bottom, text_bottom, mask)


def collect_grams(model: MultiwayTransformer, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Grams (normalised by token count, reduced over ranks) and token counts."""
    collector = GramCollector(model)
    if not collector.handles:
        raise ValueError("the model has no modality experts in linear layers: nothing for RegMean to weigh")
    try:
        for images, ids, mask in batches:
            run_routes(model, collector, images, ids, mask)
    finally:
        collector.remove()
    collector.all_reduce()
    return collector.grams(), dict(collector.counts)


def rank_batches(samples: Iterable[dict], encoder, max_text_len: int, batches: int, batch_size: int, rank: int, world: int):
    """This rank's share (every world-th sample) of the first ``batches`` global batches."""
    chunk: list[dict] = []
    for index, sample in enumerate(samples):
        if index >= batches * batch_size:
            break
        if index % world == rank:
            chunk.append(sample)
        if (index + 1) % batch_size == 0 and chunk:
            yield _encode(chunk, encoder, max_text_len)
            chunk = []
    if chunk:
        yield _encode(chunk, encoder, max_text_len)


def _encode(chunk: list[dict], encoder, max_text_len: int):
    ids, mask = encoder.encode([sample["caption"] for sample in chunk], max_text_len)
    return torch.stack([sample["image"] for sample in chunk]), ids, mask


def load_experts_model(state: dict[str, torch.Tensor], config) -> MultiwayTransformer:
    """The transformer without heads (RegMean only needs the layers' inputs)."""
    model = MultiwayTransformer(config, heads=())
    load_into(model, {key: value for key, value in state.items() if not key.startswith("heads.")}, allow_missing_prefixes=())
    return model.eval()
