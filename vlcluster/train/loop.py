"""The training loop shared by seed pre-training, VL pre-training and
fine-tuning: one Trainer, given what to train by a recipe (pre-training's in
``pretraining.py``, a downstream task's in ``vlcluster.tasks.finetune``) and
the run's settings in plain values; the stage layer (``vlcluster.stages.train``)
fills both in from the spec and runs it under torchrun.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vlcluster.data.inputs import DataSources
from vlcluster.data.loader import TrainLoader, resolve_shuffle_run, resolve_workers
from vlcluster.data.quality import DataQuality, bad_fraction, check_bad_fraction
from vlcluster.data.fields import FieldMap
from vlcluster.model import ModelConfig, MultiwayTransformer
from vlcluster.model.external import CheckpointError
from vlcluster.train import checkpoint as ckpt
from vlcluster.train.dist import DistEnv
from vlcluster.train.keylog import KeyRecorder
from vlcluster.train.optim import build_optimizer, build_scheduler
from vlcluster.train.accumulate import plan_micro_batches
from vlcluster.train.elastic import StepBatches, hash_seed, resharded_loader_state
from vlcluster.train.block_options import apply_block_options
from vlcluster.train.step import StepRunner
from vlcluster.train.parallelize import parallelize
from vlcluster.train.precision import Precision
from vlcluster.train.preempt import StopFlag, StopRequested
from vlcluster.train.tb import MetricsWriter
from vlcluster.train.model_flops import Objectives
from vlcluster.train.throughput_meter import ThroughputMeter

log = logging.getLogger("vlcluster.train")

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_STATE_LOAD = StateDictOptions(full_state_dict=True)


class Recipe(Protocol):
    """What is trained: data, model, batches and objective (pre-training or one task)."""

    sources: DataSources
    fields: FieldMap  # sample fields the loader requires
    decode: Callable | None  # raw sample -> decoded one; None: the loader's image-caption decoding
    uint8_images: bool
    counts_flops: bool  # the throughput meter counts this objective's FLOPs

    def batch_builder(self, config: ModelConfig, seed: int) -> Any: ...
    def build_model(self, config: ModelConfig) -> MultiwayTransformer: ...
    def objective(self, model: MultiwayTransformer, rank_sizes: list[int]) -> nn.Module: ...


@dataclass(frozen=True)
class TrainingRun:
    """One training stage's settings in plain values.

    ``train``: the train settings (steps, batch sizes, seed, losses, optimiser,
    precision...); ``init_weights`` loads the starting weights into a fresh model
    (not called when a checkpoint resumes); ``on_log`` hears every logged step on
    the main rank; ``export`` writes the final weights and result (main rank)."""

    name: str
    spec_hash: str
    train: Any
    checkpoint_root: Path
    checkpoint_every: int
    checkpoint_keep: int
    tensorboard: Path
    num_workers: int | str
    cpus_per_node: int | None
    ranks_per_node: int
    max_bad_fraction: float
    init_weights: Callable[[MultiwayTransformer], None] | None = None
    on_log: Callable[[int, dict[str, float]], None] | None = None
    export: Callable[[dict[str, torch.Tensor], ModelConfig, int, dict], None] | None = None
    forward_metrics: Callable[[dict[str, float], int], None] | None = None  # e.g. to W&B / MLflow


class Trainer:
    def __init__(self, run: TrainingRun, recipe: Recipe, config: ModelConfig, env: DistEnv, stop: StopFlag | None = None):
        self.run, self.recipe, self.config, self.env = run, recipe, config, env
        self.stop = stop or StopFlag()
        self.train = run.train
        self.sources = recipe.sources
        self.rank_sizes = self.train.rank_batch_sizes(env.world_size)
        self.step = 0
        self.generator = torch.Generator().manual_seed(self.train.seed * 1000 + env.rank)
        self.builder = recipe.batch_builder(config, self.train.seed * 1000 + env.rank)
        self.loader_workers = resolve_workers(
            run.num_workers, run.cpus_per_node, run.ranks_per_node,
            min(len(source.urls) for source in self.sources.train_mixture), env.world_size
        )
        self.loader = TrainLoader(
            self.sources.train_mixture, env.rank, env.world_size, self.train.seed, self.sources.shuffle_buffer,
            self.rank_sizes[env.rank], config.image_size, self.loader_workers, recipe.fields,
            self.sources.augment, pin_memory=env.device.type == "cuda", uint8_images=recipe.uint8_images,
            decode=recipe.decode, rank_sizes=self.rank_sizes,
            shuffle_run=resolve_shuffle_run(self.sources.shuffle_run, self.sources.train_mixture),
        )
        self.keys = KeyRecorder(env.rank)

        torch.manual_seed(self.train.seed)  # identical initial weights on every rank
        model = recipe.build_model(config)
        self.objective = recipe.objective(model, self.rank_sizes)
        resume = ckpt.load_intact_checkpoint(run.checkpoint_root, run.spec_hash, env)  # verified, else an older one
        if resume is None and run.init_weights is not None:
            run.init_weights(model)
        self.objective.to(env.device)
        self.precision = Precision.for_device(self.train.precision, env.device)
        apply_block_options(model.layers, self.train.activation_checkpointing, self.train.compile)
        parallelize(self.objective, self.precision.param_dtype())
        self.meter = ThroughputMeter(
            config, Objectives.from_weights(self.train.loss_weights), self.precision.name, env.device, env.world_size
        )
        self.optimizer = build_optimizer(self.objective, self.train)
        self.scheduler = build_scheduler(self.optimizer, self.train)
        micro_batches = plan_micro_batches(self.rank_sizes, self.train.micro_batch_size, env.rank)
        self.step_batches = StepBatches(self.rank_sizes, self.train.micro_batch_size, env, micro_batches)
        # FLOPs are counted for the pre-training objective's routes only (tasks' batches have other fields).
        self.stepper = StepRunner(self.objective, self.optimizer, self.precision, env.device, micro_batches, self.train.mask_prob,
                                  self.meter if recipe.counts_flops else None)
        if resume is not None:
            self.restore(resume)
        # TensorBoard purges events at and past purge_step: the first step this run logs (the checkpoint's own
        # step was logged before the kill and stays).
        self.metrics = MetricsWriter(run.tensorboard, env.is_main, purge_step=self.step + 1 if self.step else None,
                                     forward=run.forward_metrics)

    # ---- checkpoints -------------------------------------------------------

    def save(self) -> None:
        model_state = get_model_state_dict(self.objective, options=FULL_STATE)
        optim_state = get_optimizer_state_dict(self.objective, self.optimizer, options=FULL_STATE)
        rank_tensors = {"torch_rng": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available() and self.env.device.type == "cuda":
            rank_tensors["cuda_rng"] = torch.cuda.get_rng_state(self.env.device)
        rank_info = {"loader": self.loader.state_dict(), "questions_rng": _jsonable(self.builder.rng.getstate())}
        meta = {
            "spec_hash": self.run.spec_hash,
            "world_size": self.env.world_size,
            "scheduler": self.scheduler.state_dict(),
            "model_config": self.config.to_dict(),
            "precision": self.precision.state_dict(),
        }
        path = ckpt.save_checkpoint(
            self.run.checkpoint_root, self.step, self.env, model_state, optim_state, meta,
            rank_tensors, rank_info, self.run.checkpoint_keep,
        )
        if self.env.is_main:
            log.info("checkpoint saved: %s", path)
            self.metrics.sync()  # remote tb/ is as current as the checkpoint

    def restore(self, loaded: ckpt.LoadedCheckpoint) -> None:
        checkpoint = loaded
        set_model_state_dict(self.objective, loaded.model_state, options=FULL_STATE_LOAD)
        set_optimizer_state_dict(self.objective, self.optimizer, loaded.optim_state, options=FULL_STATE_LOAD)
        self.scheduler.load_state_dict(loaded.meta["scheduler"])
        self.precision.load_state_dict(loaded.meta.get("precision", {}))
        torch.set_rng_state(loaded.rank_tensors["torch_rng"])
        self.generator.set_state(loaded.rank_tensors["generator"])
        if "cuda_rng" in loaded.rank_tensors and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(loaded.rank_tensors["cuda_rng"], self.env.device)
        self.builder.rng.setstate(_tupled(loaded.rank_info["questions_rng"]))
        self.step = loaded.step
        try:
            self.loader.load_state_dict(*resharded_loader_state(loaded, self.env.rank))
        except ValueError as exc:
            raise CheckpointError(f"{checkpoint.path}: {exc}") from None
        if loaded.saved_rank_info is not None:
            # Another number of ranks: the per-rank RNG streams cannot continue one to one; new, distinct ones.
            self.generator.manual_seed(hash_seed(self.train.seed, self.env.rank, self.step, "masks"))
            self.builder.rng.seed(f"{self.train.seed}:{self.env.rank}:{self.step}:questions")
            if self.env.is_main:
                log.info("resuming on %d ranks from a checkpoint of %d: the data continues at global position %d",
                         self.env.world_size, loaded.saved_world, self.loader.position.position)
        if self.env.is_main:
            log.info("resuming from checkpoint %s (step %d of %d)", checkpoint.path.name, self.step, self.train.steps)

    # ---- the loop ------------------------------------------------------------

    def fit(self) -> dict:
        total = self.train.steps
        with_questions = self.train.loss_weights.vqa > 0
        window_start, window_samples = time.perf_counter(), 0
        history: dict[str, float] = {}
        if self.env.is_main:
            log.info(
                "training %s (%s, %.2fM params) for %d steps, batch %d over %d ranks, %d data-loader workers each, from step %d",
                self.run.name, self.config.arch, self.objective.model.num_params() / 1e6,
                total, self.train.batch_size, self.env.world_size, self.loader_workers, self.step,
            )
            log.info("precision %s (train.precision: %s) on %s, %d CPU threads per rank",
                     self.precision.name, self.train.precision, self.env.device, torch.get_num_threads())
        started = time.perf_counter()
        first_step = self.step
        try:
            while self.step < total:
                out = self.train_step(with_questions)
                window_samples += self.train.batch_size
                if self.step % self.train.log_every == 0 or self.step == total:
                    history = self.log_step(out, window_samples / (time.perf_counter() - window_start))
                    window_start, window_samples = time.perf_counter(), 0
                saved = self.step % self.run.checkpoint_every == 0 or self.step == total
                if saved:
                    self.save()
                if self.step < total and self.stop.agreed(self.env.device):
                    if not saved:
                        self.save()
                    if self.env.is_main:
                        log.info("stop requested: checkpoint at step %d saved, exiting to be requeued", self.step)
                    raise StopRequested
        finally:
            self.loader.close()
        elapsed = time.perf_counter() - started
        steps_run = self.step - first_step
        return {
            "steps": self.step,
            "final": history,
            "samples_per_s": steps_run * self.train.batch_size / elapsed if steps_run else None,
            "data": self.data_summary(),
            "precision": self.precision.state_dict(),
            "throughput": self.meter.summary(),
        }

    def train_step(self, with_questions: bool) -> dict[str, torch.Tensor]:
        samples = self.loader.next_batch()
        self.stepper.micro_batches = self.step_batches.plan(len(samples["key"]))  # bad samples shrink a rank's batch
        out = self.stepper.run(self.builder(samples, with_questions), self.generator)
        self.scheduler.step()
        self.step += 1
        self.keys.record(self.step, samples["key"])
        return out

    def log_step(self, out: dict[str, torch.Tensor], samples_per_s: float) -> dict[str, float]:
        names = sorted(out)
        values = torch.stack([out[name].detach().float() for name in names])
        if dist.is_initialized():  # on the device: NCCL reduces only CUDA tensors
            dist.all_reduce(values)
            values /= self.env.world_size
        values = values.cpu()
        scalars = {f"loss/{name}": value for name, value in zip(names, values.tolist())}
        scalars["lr"] = self.scheduler.get_last_lr()[0]
        scalars["throughput/samples_per_s"] = samples_per_s
        scalars.update(self.meter.window())
        if self.precision.scaler is not None:
            scalars["precision/loss_scale"] = self.precision.loss_scale
            scalars["precision/skipped_steps"] = self.precision.skipped_steps
        bad, read = self.global_data_counts()
        scalars["data/bad_samples"], scalars["data/bad_fraction"] = bad, bad_fraction(bad, read)
        self.metrics.add(scalars, self.step)
        if self.env.is_main:
            losses = " ".join(f"{name} {scalars[f'loss/{name}']:.3f}" for name in names)
            pct = 100 * self.step / self.train.steps
            bad_note = f" | {bad} bad samples skipped" if bad else ""
            log.info(
                "step %d/%d (%.0f%%) %s | lr %.2e | %.0f samples/s | %s%s", self.step, self.train.steps, pct, losses,
                scalars["lr"], samples_per_s, ThroughputMeter.describe(scalars), bad_note,
            )
            if self.run.on_log is not None:
                self.run.on_log(self.step, scalars)  # e.g. <stage>/progress.json for `vlcluster status`
        # Every rank sees the same global counts, so all of them stop here together.
        check_bad_fraction(bad, read, self.run.max_bad_fraction, final=self.step == self.train.steps)
        return scalars

    def global_data_counts(self) -> tuple[int, int]:
        """Bad and read samples over all ranks so far (collective)."""
        counts = torch.tensor([self.loader.quality.bad_total, self.loader.quality.read], dtype=torch.float64, device=self.env.device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        return int(counts[0]), int(counts[1])

    def data_summary(self) -> dict:
        """Bad-data counts of all ranks, per shard and reason, for ``result.json`` (collective)."""
        states = [self.loader.quality.state_dict()]
        if dist.is_initialized():
            states = [None] * self.env.world_size
            dist.all_gather_object(states, self.loader.quality.state_dict())
        total = DataQuality.total(DataQuality.from_state(state) for state in states)
        return total.summary(self.run.max_bad_fraction)

    def export(self, summary: dict) -> None:
        state = get_model_state_dict(self.objective.model, options=FULL_STATE)
        self.metrics.close()  # before the done-marker: on an object store this uploads tb/
        if self.env.is_main and self.run.export is not None:
            self.run.export(state, self.config, self.step, summary)


def _jsonable(state):
    return json.loads(json.dumps(state))


def _tupled(value):
    return tuple(_tupled(item) for item in value) if isinstance(value, list) else value
