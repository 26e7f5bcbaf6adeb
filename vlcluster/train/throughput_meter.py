"""Throughput of a training run: samples/s, tokens/s, model TFLOP/s, MFU and
peak GPU memory, for TensorBoard, the progress line and ``result.json``.

Every rank counts the model FLOPs of the batches it trained on
(``model_flops.train_flops_per_sample`` at the batch's real padded text length);
at each log step the counts are summed over ranks (one all-reduce) and
divided by the wall time since the previous log step. MFU is that rate per
device over the device's peak dense FLOP/s in the run's precision
(``device_peaks.peak_tflops``); it is left out where the peak is unknown (CPUs).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from vlcluster.model.config import ModelConfig
from vlcluster.train.batches import Batch
from vlcluster.train.device_peaks import peak_tflops
from vlcluster.train.model_flops import Objectives, StepShape, tokens_per_sample, train_flops_per_sample

CLS_AND_SEP = 2  # special tokens of every caption that MLM never masks


def expected_masked_tokens(text_mask: torch.Tensor, mask_prob: float) -> float:
    """MLM positions per sample: ``mask_prob`` of the maskable tokens, at least one (as ``mask_tokens`` forces)."""
    maskable = (text_mask.sum(dim=1).float() - CLS_AND_SEP).clamp(min=0)
    return float((maskable * mask_prob).clamp(min=1.0).mean())


def batch_shape(batch: Batch, rank_batch: int, global_batch: int, mask_prob: float) -> StepShape:
    return StepShape(
        text_len=batch.text_ids.shape[1],
        rank_batch=rank_batch,
        global_batch=global_batch,
        masked_tokens=expected_masked_tokens(batch.text_mask, mask_prob),
        question_len=batch.question_ids.shape[1] if batch.question_ids is not None else 0,
    )


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class ThroughputMeter:
    def __init__(self, config: ModelConfig, objectives: Objectives, precision: str, device: torch.device, world_size: int):
        self.config, self.objectives, self.device, self.world_size = config, objectives, device, world_size
        self.precision = precision
        self.peak = peak_tflops(device_name(device), precision) if device.type == "cuda" else None
        self._counts = torch.zeros(3, dtype=torch.float64)  # flops, samples, tokens of this rank since the last window
        self._since = time.perf_counter()
        self.total = {"flops": 0.0, "samples": 0.0, "tokens": 0.0, "seconds": 0.0}

    def record(self, shape: StepShape, samples: int) -> None:
        flops = train_flops_per_sample(self.config, self.objectives, shape) * samples
        self._counts += torch.tensor([flops, samples, tokens_per_sample(self.config, shape) * samples], dtype=torch.float64)

    def window(self) -> dict[str, float]:
        """Rates since the previous call, over all ranks (collective: every rank calls it)."""
        counts = self._counts.to(self.device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        flops, samples, tokens = counts.cpu().tolist()
        now = time.perf_counter()
        seconds = max(now - self._since, 1e-9)
        self._since, self._counts = now, torch.zeros_like(self._counts)
        for key, value in (("flops", flops), ("samples", samples), ("tokens", tokens), ("seconds", seconds)):
            self.total[key] += value
        return self.rates(flops, tokens, seconds)

    def rates(self, flops: float, tokens: float, seconds: float) -> dict[str, float]:
        tflops = flops / seconds / 1e12
        out = {
            "throughput/tokens_per_s": tokens / seconds,
            "throughput/tflops": tflops,
            "throughput/tflops_per_device": tflops / self.world_size,
        }
        if self.peak:
            out["throughput/mfu"] = tflops / self.world_size / self.peak
        if self.device.type == "cuda":
            out["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def summary(self) -> dict[str, float | None]:
        """The whole run's averages for ``result.json``."""
        total = self.total
        if not total["seconds"]:
            return {}
        rates = self.rates(total["flops"], total["tokens"], total["seconds"])
        return {
            "samples_per_s": total["samples"] / total["seconds"],
            "tokens_per_s": rates["throughput/tokens_per_s"],
            "tflops": rates["throughput/tflops"],
            "tflops_per_device": rates["throughput/tflops_per_device"],
            "mfu": rates.get("throughput/mfu"),
            "peak_tflops_per_device": self.peak,
            "peak_memory_gb": rates.get("memory/peak_gb"),
            "train_flops_per_sample": total["flops"] / total["samples"] if total["samples"] else None,
            # what `plan` matches a measured MFU by (estimate.py)
            "device": device_name(self.device),
            "precision": self.precision,
        }

    @staticmethod
    def describe(scalars: dict[str, float]) -> str:
        """The progress line's part: TFLOP/s per device, MFU, peak memory (what is known)."""
        parts = [f"{scalars['throughput/tflops_per_device']:.3g} TFLOP/s/dev"]
        if "throughput/mfu" in scalars:
            parts.append(f"MFU {100 * scalars['throughput/mfu']:.1f}%")
        if "memory/peak_gb" in scalars:
            parts.append(f"{scalars['memory/peak_gb']:.1f} GB peak")
        return " | ".join(parts)
