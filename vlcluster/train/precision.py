"""Numeric precision of a training run: which dtype the matmuls run in, and
the loss scaling fp16 needs.

``train.precision`` is one of

- ``fp32``: everything in float32;
- ``bf16`` / ``fp16``: parameters are cast to the low dtype for forward and
  backward (FSDP2's ``MixedPrecisionPolicy``: ``param_dtype`` low), gradients
  are reduced in float32 and the optimizer updates float32 master weights
  (the sharded parameters FSDP2 keeps stay float32). A world of one (no
  FSDP2, see ``dist.sharded_run``) runs the model under ``torch.autocast``
  instead: float32 weights, matmuls in the low dtype.
- ``auto``: bf16 where the device supports it natively (CUDA compute
  capability >= 8.0: A100, H100, H200, L40S, ...), fp16 on older GPUs
  (V100, T4), and fp32 on the CPU: CPUs have no tensor cores, and bf16/fp16
  matmuls there are emulated on most machines and slower than float32.

fp16 has a narrow exponent range, so the loss is multiplied by a dynamic
scale before backward and the gradients divided by it before the optimizer
step; a step whose gradients overflowed (inf/NaN) is skipped on every rank
and the scale halved, and after ``growth_interval`` clean steps the scale
doubles. The FSDP1 ``ShardedGradScaler`` is used with FSDP2: its
``unscale_`` all-reduces the overflow flag, so a rank whose gradient shard
overflowed makes every rank skip the step (torch 2.13's DTensor dispatch of
the overflow check also agrees across ranks; the explicit all-reduce keeps
that true on older torch). The scaler's state is part of the checkpoint.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from vlcluster.train.dist import sharded_run

Requested = str  # "fp32" | "bf16" | "fp16" | "auto"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_BF16_CAPABILITY = (8, 0)


class PrecisionError(ValueError):
    """An impossible precision for this device; the message is one paragraph for the user."""


@dataclass(frozen=True)
class DeviceTraits:
    """What the precision choice depends on, read from the device once."""

    kind: str  # "cuda" | "cpu"
    name: str
    capability: tuple[int, int] | None  # CUDA compute capability

    @property
    def native_bf16(self) -> bool:
        return self.kind == "cuda" and self.capability is not None and self.capability >= MIN_BF16_CAPABILITY

    @classmethod
    def of(cls, device: torch.device) -> DeviceTraits:
        if device.type == "cuda":
            return cls("cuda", torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
        return cls(device.type, device.type, None)


def resolve_precision(requested: Requested, traits: DeviceTraits) -> str:
    """The precision a run uses on this device; raises PrecisionError for an impossible choice."""
    if requested not in (*DTYPES, "auto"):
        raise PrecisionError(f"train.precision {requested!r} is not one of fp32, bf16, fp16, auto")
    if requested == "auto":
        if traits.kind == "cuda":
            return "bf16" if traits.native_bf16 else "fp16"
        return "fp32"
    if requested == "bf16" and traits.kind == "cuda" and not traits.native_bf16:
        major, minor = traits.capability or (0, 0)
        raise PrecisionError(
            f"train.precision is bf16, but this GPU ({traits.name}, compute capability {major}.{minor}) has no "
            "native bfloat16: bf16 needs compute capability 8.0 or newer (A100, H100, L40S, ...). On this GPU "
            "use precision: fp16 (tensor cores with a dynamic loss scale) or auto, which picks fp16 here"
        )
    return requested


def scaler_options() -> dict[str, Any]:
    """The dynamic loss scale's settings (torch's defaults, written out because resume relies on them)."""
    return {"init_scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000}


class Precision:
    """The resolved precision of one run: dtypes, autocast and the fp16 loss scale."""

    def __init__(self, name: str, device: torch.device, distributed: bool | None = None):
        self.name = name
        self.device = device
        self.dtype = DTYPES[name]
        self.distributed = sharded_run() if distributed is None else distributed  # FSDP2 shards the model
        self.scaler = self._scaler() if name == "fp16" else None
        self.skipped_steps = 0

    @classmethod
    def for_device(cls, requested: Requested, device: torch.device) -> Precision:
        return cls(resolve_precision(requested, DeviceTraits.of(device)), device)

    @property
    def low(self) -> bool:
        return self.dtype != torch.float32

    def _scaler(self) -> torch.amp.GradScaler:
        if self.distributed:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(device=self.device.type, **scaler_options())
        return torch.amp.GradScaler(self.device.type, **scaler_options())

    def param_dtype(self) -> torch.dtype | None:
        """FSDP2's compute dtype for parameters (None: keep float32)."""
        return self.dtype if self.low else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for a model without FSDP (FSDP2 casts the parameters itself)."""
        if self.low and not self.distributed:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale (fp16), step and update the scale; returns False when the step was skipped on every rank."""
        if self.scaler is None:
            optimizer.step()
            return True
        self.scaler.unscale_(optimizer)  # the overflow flag, agreed across ranks, before any update
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= before  # the scale only shrinks after an overflow
        self.skipped_steps += not stepped
        return stepped

    @property
    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler else None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for the checkpoint's meta.json."""
        state: dict[str, Any] = {"precision": self.name, "skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()  # plain floats and ints
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        saved = state.get("scaler")
        if self.scaler is not None and saved:
            self.scaler.load_state_dict(dict(saved))
