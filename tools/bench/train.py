"""Training step throughput: vlcluster's trainer path against a plain eager baseline.

    python tools/bench/train.py                       # CPU: tiny model, fp32
    python tools/bench/train.py --size base --batch 128 --image-size 224 --text-len 40 --precision bf16   # GPU

In this one process, on one device, the same model (arch agnostic), the
same objective (ITC + ITM + MLM, the seed pre-training mix) and the same
batches of random pixels and tokens:

- (a) eager baseline: ``MultiwayTransformer`` + ``Objective`` as plain
  PyTorch code would run them: float32 images copied from pageable host
  memory, ``torch.autocast`` in the precision (plus a ``GradScaler`` for
  fp16), the default AdamW, no compile, no FSDP;
- (b) vlcluster's trainer path as ``torchrun --nproc_per_node=1`` runs it:
  a one-rank process group (where FSDP2 is left out: nothing to shard, see
  ``train/dist.py``; mixed precision by autocast), ``train.compile`` (blocks
  through TorchInductor; on by default on a GPU, off on a CPU where code
  generation takes minutes), fused AdamW on CUDA, pinned uint8 images
  normalised on the device, the trainer's ``StepRunner`` (the data loader
  is not part of it: see ``tools/bench/loader.py``);
- (c) = (b) with ``train.activation_checkpointing``: the memory it saves,
  the time it costs.

Prints samples/s, the ratio b/a, model TFLOP/s (``train/model_flops.py``), MFU
against the device's peak (``train/device_peaks.py``; none on a CPU) and peak
device memory; ``--out FILE`` also writes them as JSON. The first
``--warmup`` steps of each contender (compilation, allocator warm-up) are
not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vlcluster.jobspec.models import LossWeights, TrainSpec
from vlcluster.model import MultiwayTransformer, preset
from vlcluster.train.accumulate import plan_micro_batches
from vlcluster.train.batches import Batch
from vlcluster.train.device_peaks import peak_tflops
from vlcluster.train.model_flops import Objectives, StepShape, train_flops_per_sample
from vlcluster.train.objective import Objective
from vlcluster.train.optim import build_optimizer
from vlcluster.train.parallelize import parallelize
from vlcluster.train.precision import DTYPES, Precision
from vlcluster.train.block_options import apply_block_options
from vlcluster.train.step import StepRunner
from vlcluster.train.throughput_meter import device_name, expected_masked_tokens

WEIGHTS = LossWeights(itc=1.0, itm=1.0, mlm=0.25)
SPECIAL = [0, 1, 2, 3, 4]
MASK_ID, MASK_PROB = 4, 0.15


@dataclass
class Result:
    name: str
    samples_per_s: float
    tflops: float
    mfu: float | None
    peak_memory_gb: float | None
    losses: list[float]


def host_batches(count: int, batch: int, image_size: int, text_len: int, vocab: int) -> list[Batch]:
    """Random pixels (uint8, as the loader ships them) and full-length captions; the same for every contender."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (batch, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
        ids = torch.randint(len(SPECIAL), vocab, (batch, text_len), generator=generator)
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
        out.append(Batch(pixels, ids, torch.ones(batch, text_len, dtype=torch.bool)))
    return out


def build_objective(args, device: torch.device, batch: int) -> Objective:
    torch.manual_seed(0)
    config = preset(args.size, "agnostic", image_size=args.image_size, max_text_len=args.text_len, num_answers=0)
    model = MultiwayTransformer(config, heads=("itc", "itm", "mlm"))
    return Objective(model, WEIGHTS, SPECIAL, MASK_ID, MASK_PROB, [batch]).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(name: str, step, batches: list[Batch], args, device: torch.device, flops_per_sample: float) -> Result:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = []
    for batch in batches[: args.warmup]:
        losses.append(step(batch))
    sync(device)
    started = time.perf_counter()
    for batch in batches[args.warmup :]:
        losses.append(step(batch))
    sync(device)
    seconds = time.perf_counter() - started
    samples_per_s = args.steps * args.batch / seconds
    tflops = samples_per_s * flops_per_sample / 1e12
    peak = peak_tflops(device_name(device), args.precision) if device.type == "cuda" else None
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Result(name, samples_per_s, tflops, tflops / peak if peak else None, memory, losses)


def eager_baseline(args, device: torch.device, batches: list[Batch], flops: float) -> Result:
    objective = build_objective(args, device, args.batch)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    dtype = DTYPES[args.precision]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    generator = torch.Generator().manual_seed(0)
    host_float = [Batch(b.to(torch.device("cpu")).images, b.text_ids, b.text_mask) for b in batches]  # float32 on the host

    def step(batch: Batch) -> float:
        batch = Batch(*(t.to(device) for t in (batch.images, batch.text_ids, batch.text_mask)))
        with autocast():
            loss = objective(batch, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss.detach()

    result = timed("(a) eager baseline", step, host_float, args, device, flops)
    result.losses = [float(loss) for loss in result.losses]
    return result


def trainer_path(args, device: torch.device, batches: list[Batch], flops: float, checkpointing: bool) -> Result:
    objective = build_objective(args, device, args.batch)
    precision = Precision.for_device(args.precision, device)
    apply_block_options(objective.model.layers, activation_checkpointing=checkpointing, compile=args.compile)
    parallelize(objective, precision.param_dtype())
    optimizer = build_optimizer(objective, TrainSpec(steps=1000, lr=1e-4))
    runner = StepRunner(objective, optimizer, precision, device, plan_micro_batches([args.batch], None, 0), MASK_PROB)
    generator = torch.Generator().manual_seed(0)
    pinned = [Batch(b.images.pin_memory(), b.text_ids, b.text_mask) if device.type == "cuda" else b for b in batches]

    def step(batch: Batch) -> float:
        return runner.run(batch, generator)["loss"]

    name = "(c) vlcluster + activation ckpt" if checkpointing else "(b) vlcluster trainer"
    result = timed(name, step, pinned, args, device, flops)
    result.losses = [float(loss) for loss in result.losses]
    return result


def start_process_group(device: torch.device) -> None:
    """A world of one, as ``torchrun --nproc_per_node=1`` gives the trainer (FSDP2 needs a group)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="base" if gpu else "tiny", choices=["tiny", "base"])
    parser.add_argument("--batch", type=int, default=128 if gpu else 32)
    parser.add_argument("--image-size", type=int, default=224 if gpu else 32)
    parser.add_argument("--text-len", type=int, default=40 if gpu else 16)
    parser.add_argument("--precision", default="auto", choices=["fp32", "bf16", "fp16", "auto"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=gpu)
    parser.add_argument("--steps", type=int, default=20 if gpu else 5, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=5 if gpu else 2)
    parser.add_argument("--out", help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.precision = Precision.for_device(args.precision, device).name  # auto -> what this device runs
    config = preset(args.size, "agnostic", image_size=args.image_size, max_text_len=args.text_len, num_answers=0)
    batches = host_batches(args.warmup + args.steps, args.batch, args.image_size, args.text_len, config.vocab_size)
    shape = StepShape(args.text_len, args.batch, args.batch, expected_masked_tokens(batches[0].text_mask, MASK_PROB))
    flops = train_flops_per_sample(config, Objectives.from_weights(WEIGHTS), shape)
    print(
        f"{device_name(device)}: size {args.size}, batch {args.batch}, {args.image_size}px, text {args.text_len}, "
        f"{args.precision}, compile {args.compile}, {flops / 1e9:.2f} GFLOP per sample (fwd+bwd), "
        f"{args.warmup} warm-up + {args.steps} timed steps each",
        flush=True,
    )
    baseline = eager_baseline(args, device, batches, flops)
    start_process_group(device)
    results = [baseline, trainer_path(args, device, batches, flops, False), trainer_path(args, device, batches, flops, True)]
    print_table(results)
    if args.out:
        with open(args.out, "w") as out:
            json.dump({"args": vars(args), "device": device_name(device), "flops_per_sample": flops,
                       "ratio_b_over_a": results[1].samples_per_s / baseline.samples_per_s,
                       "results": [vars(r) for r in results]}, out, indent=2)
    dist.destroy_process_group()


def print_table(results: list[Result]) -> None:
    baseline = results[0].samples_per_s
    print(f"{'contender':34s} {'samples/s':>10s} {'x (a)':>7s} {'TFLOP/s':>9s} {'MFU':>7s} {'peak GB':>8s}  first/last loss")
    for r in results:
        mfu = f"{100 * r.mfu:6.1f}%" if r.mfu is not None else "    n/a"
        memory = f"{r.peak_memory_gb:8.2f}" if r.peak_memory_gb is not None else "     n/a"
        print(f"{r.name:34s} {r.samples_per_s:10.1f} {r.samples_per_s / baseline:7.2f} {r.tflops:9.3g} {mfu} {memory}  "
              f"{r.losses[0]:.3f}/{r.losses[-1]:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
