"""AdamW with the usual decay exclusions, linear warm-up then linear decay."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class OptimizerSettings(Protocol):
    """What the optimizer and its schedule read (a job file's ``train`` section is one)."""

    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    steps: int  # the schedule decays to 0 at this step


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay only on matrices of the transformer and heads; not on
    norms, biases, embeddings or the ITC temperature (all but embeddings are
    vectors)."""
    return param.ndim >= 2 and ".embed." not in f".{name}"


def build_optimizer(module: nn.Module, train: OptimizerSettings) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, **implementation(decay + no_decay))


def implementation(params: list[torch.Tensor]) -> dict[str, bool]:
    """AdamW's fastest implementation for these parameters: the fused CUDA
    kernel (one launch for all tensors) on GPUs, the multi-tensor foreach one elsewhere."""
    if params and all(p.device.type == "cuda" for p in params):
        return {"fused": True}
    return {"foreach": True}


def lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    remaining = max(total - warmup, 1)
    return max(0.0, 1.0 - (step - warmup) / remaining)


def build_scheduler(optimizer: torch.optim.Optimizer, train: OptimizerSettings) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup_steps, train.steps)
    )
