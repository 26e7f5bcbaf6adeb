"""Per-block speed options: activation checkpointing and torch.compile.

Both work on each transformer block in place, before FSDP2 shards it, and
keep parameter names unchanged (checkpoints and merging rely on them):

- activation checkpointing replaces the block's ``forward`` with one that
  keeps only the block's input and recomputes the rest in backward
  (``torch.utils.checkpoint``, non-reentrant). Same FLOPs plus one forward
  of the blocks, a fraction of the activation memory: for batches that do
  not fit otherwise.
- compile (``nn.Module.compile``) runs each block through TorchInductor:
  fused norms, GELU and residual adds around the matmuls and attention.
  A block is called per modality route (image, text, fusion) with different
  sequence lengths; Dynamo specialises on the route and makes the lengths
  dynamic after the first change, so a handful of graphs per block.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_activations(block: nn.Module) -> None:
    forward = block.forward

    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def apply_block_options(
    blocks: nn.ModuleList, activation_checkpointing: bool = False, compile: bool = False, backend: str = "inductor"
) -> None:
    for block in blocks:
        if activation_checkpointing:
            checkpoint_activations(block)
        if compile:
            block.compile(backend=backend)
