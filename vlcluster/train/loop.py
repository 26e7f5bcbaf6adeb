"""The training loop shared by seed pre-training, VL pre-training and
fine-tuning: one Trainer, configured by the stage spec, run under torchrun.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vlcluster.stages.context import StageContext
from vlcluster.data.loader import TrainLoader, resolve_workers
from vlcluster.data.quality import BadDataError, DataQuality, bad_fraction, check_bad_fraction
from vlcluster.data.tokenizer import TextEncoder
from vlcluster.failure import note_failure, peer_lost, said_in_one_paragraph
from vlcluster.model import MultiwayTransformer, expand_to_experts, load_into
from vlcluster.model.external import CheckpointError, init_from_checkpoint
from vlcluster.model.posembed import fit_position_table
from vlcluster.tasks.finetune import TaskTraining
from vlcluster.model.files import read_model, write_model
from vlcluster.stages.outputs import finish_stage
from vlcluster.stages.progress import report_training_progress
from vlcluster.train import checkpoint as ckpt
from vlcluster.train.batches import BatchBuilder
from vlcluster.train.dist import DistEnv, exit_process, init_distributed
from vlcluster.train.keylog import KeyRecorder
from vlcluster.train.model_config import build_model_config
from vlcluster.train.objective import Objective
from vlcluster.train.optim import build_optimizer, build_scheduler
from vlcluster.train.accumulate import plan_micro_batches
from vlcluster.train.elastic import StepBatches, hash_seed, resharded_loader_state
from vlcluster.train.block_options import apply_block_options
from vlcluster.train.step import StepRunner
from vlcluster.errors import EXIT_REQUEUE
from vlcluster.train.parallelize import parallelize
from vlcluster.train.precision import Precision, PrecisionError
from vlcluster.train.preempt import StopFlag, StopRequested
from vlcluster.train.tb import MetricsWriter
from vlcluster.train.model_flops import Objectives
from vlcluster.train.throughput_meter import ThroughputMeter
from vlcluster.storage.paths import run_path

log = logging.getLogger("vlcluster.train")

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL_STATE_LOAD = StateDictOptions(full_state_dict=True)


class Trainer:
    def __init__(self, ctx: StageContext, env: DistEnv, stop: StopFlag | None = None):
        self.ctx, self.env = ctx, env
        self.stop = stop or StopFlag()
        spec = ctx.spec
        self.train = spec.train
        # A downstream task (finetune with task:) supplies data, model, batches and objective.
        self.task = TaskTraining(ctx) if getattr(spec, "task", None) else None
        self.sources = self.task.sources if self.task else ctx.data_sources(spec.data)
        self.encoder = self.task.encoder if self.task else TextEncoder(self.sources.tokenizer)
        self.answers = json.loads(Path(self.sources.answers).read_text()) if self.sources.answers else []
        self.config = self.task.model_config() if self.task else build_model_config(ctx, self.encoder.vocab_size, len(self.answers))
        self.rank_sizes = self.train.rank_batch_sizes(env.world_size)
        self.step = 0
        self.generator = torch.Generator().manual_seed(self.train.seed * 1000 + env.rank)
        seed = self.train.seed * 1000 + env.rank
        self.builder = self.task.batch_builder(self.config, seed) if self.task else BatchBuilder(self.encoder, self.config.max_text_len, self.answers, seed)
        self.loader_workers = resolve_workers(
            spec.data.num_workers, spec.resources.cpus_per_node, spec.resources.ranks_per_node,
            min(len(source.urls) for source in self.sources.train_mixture), env.world_size
        )
        self.loader = TrainLoader(
            self.sources.train_mixture, env.rank, env.world_size, self.train.seed, self.sources.shuffle_buffer,
            self.rank_sizes[env.rank], self.config.image_size, self.loader_workers,
            self.sources.fields.requiring(*(["qa"] if self.train.loss_weights.vqa > 0 and not self.task else [])),
            self.sources.augment, pin_memory=env.device.type == "cuda", uint8_images=self.task is None,
            decode=self.task.decode if self.task else None, rank_sizes=self.rank_sizes,
            shuffle_run=self.sources.shuffle_run,
        )
        self.keys = KeyRecorder(env.rank)

        torch.manual_seed(self.train.seed)  # identical initial weights on every rank
        if self.task:
            model = self.task.build_model(self.config)
            self.objective = self.task.objective(model, self.rank_sizes)
        else:
            model = MultiwayTransformer(self.config, heads=self.head_names())
            self.objective = Objective(
                model, self.train.loss_weights, sorted(self.encoder.special_ids), self.encoder.mask_id,
                self.train.mask_prob, self.rank_sizes, self.train.vqa_loss,
            )
        resume = ckpt.load_intact_checkpoint(self.checkpoint_root, ctx.spec_hash, env)  # verified, else an older one
        if resume is None and spec.init is not None:
            self.load_init(model)
        self.objective.to(env.device)
        self.precision = Precision.for_device(self.train.precision, env.device)
        apply_block_options(model.layers, self.train.activation_checkpointing, self.train.compile)
        parallelize(self.objective, self.precision.param_dtype())
        self.meter = ThroughputMeter(
            self.config, Objectives.from_weights(self.train.loss_weights), self.precision.name, env.device, env.world_size
        )
        self.optimizer = build_optimizer(self.objective, self.train)
        self.scheduler = build_scheduler(self.optimizer, self.train)
        micro_batches = plan_micro_batches(self.rank_sizes, self.train.micro_batch_size, env.rank)
        self.step_batches = StepBatches(self.rank_sizes, self.train.micro_batch_size, env, micro_batches)
        # FLOPs are counted for the pre-training objective's routes only (tasks' batches have other fields).
        self.stepper = StepRunner(self.objective, self.optimizer, self.precision, env.device, micro_batches, self.train.mask_prob,
                                  None if self.task else self.meter)
        if resume is not None:
            self.restore(resume)
        self.metrics = MetricsWriter(ctx.dir.tensorboard, env.is_main, purge_step=self.step)

    @property
    def checkpoint_root(self) -> Path:
        configured = self.ctx.spec.checkpoint.dir
        return run_path(configured) if configured else self.ctx.dir.checkpoints

    def head_names(self) -> tuple[str, ...]:
        weights = self.train.loss_weights
        names = [name for name in ("itc", "itm", "mlm", "vqa") if getattr(weights, name) > 0]
        if "itm" in names and "itc" not in names:
            names.append("itc")  # ITM mines its negatives from ITC similarities
        return tuple(names)

    def load_init(self, model: MultiwayTransformer) -> None:
        init = self.ctx.spec.init
        if init.checkpoint is not None:
            from vlcluster.hub import is_hub, local_snapshot

            source = str(local_snapshot(init.checkpoint, "init.checkpoint")) if is_hub(init.checkpoint) else init.checkpoint
            report = init_from_checkpoint(model, source, init.format)
            if self.env.is_main:
                log.info("initialised from checkpoint:\n  %s", "\n  ".join(report.lines()))
            return
        source = init.from_
        state, source_config = read_model(self.ctx.upstream_dir(source))
        state = fit_position_table(expand_to_experts(state, model), model)  # e.g. 384px fine-tune of a 224px model
        load_into(model, state, allow_missing_prefixes=tuple(f"heads.{name}" for name in model.heads))
        if self.env.is_main:
            log.info("initialised from stage %r (%s -> %s)", source, source_config.arch, self.config.arch)

    # ---- checkpoints -------------------------------------------------------

    def save(self) -> None:
        model_state = get_model_state_dict(self.objective, options=FULL_STATE)
        optim_state = get_optimizer_state_dict(self.objective, self.optimizer, options=FULL_STATE)
        rank_tensors = {"torch_rng": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available() and self.env.device.type == "cuda":
            rank_tensors["cuda_rng"] = torch.cuda.get_rng_state(self.env.device)
        rank_info = {"loader": self.loader.state_dict(), "questions_rng": _jsonable(self.builder.rng.getstate())}
        meta = {
            "spec_hash": self.ctx.spec_hash,
            "world_size": self.env.world_size,
            "scheduler": self.scheduler.state_dict(),
            "model_config": self.config.to_dict(),
            "precision": self.precision.state_dict(),
        }
        path = ckpt.save_checkpoint(
            self.checkpoint_root, self.step, self.env, model_state, optim_state, meta,
            rank_tensors, rank_info, self.ctx.spec.checkpoint.keep,
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
                self.ctx.name, self.config.arch, self.objective.model.num_params() / 1e6,
                total, self.train.batch_size, self.env.world_size, self.loader_workers, self.step,
            )
            log.info("precision %s (train.precision: %s) on %s", self.precision.name, self.train.precision, self.env.device)
        started = time.perf_counter()
        first_step = self.step
        try:
            while self.step < total:
                out = self.train_step(with_questions)
                window_samples += self.train.batch_size
                if self.step % self.train.log_every == 0 or self.step == total:
                    history = self.log_step(out, window_samples / (time.perf_counter() - window_start))
                    window_start, window_samples = time.perf_counter(), 0
                saved = self.step % self.ctx.spec.checkpoint.every == 0 or self.step == total
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
            report_training_progress(self.ctx, self.step, scalars)  # <stage>/progress.json for `vlcluster status`
        # Every rank sees the same global counts, so all of them stop here together.
        check_bad_fraction(bad, read, self.ctx.spec.data.max_bad_fraction, final=self.step == self.train.steps)
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
        return total.summary(self.ctx.spec.data.max_bad_fraction)

    def export(self, summary: dict) -> None:
        state = get_model_state_dict(self.objective.model, options=FULL_STATE)
        self.metrics.close()  # before the done-marker: on an object store this uploads tb/
        if self.env.is_main:
            write_model(self.ctx.dir, state, self.config, {"stage": self.ctx.name, "steps": self.step})
            finish_stage(self.ctx, summary)


def _jsonable(state):
    return json.loads(json.dumps(state))


def _tupled(value):
    return tuple(_tupled(item) for item in value) if isinstance(value, list) else value


def run_training(ctx: StageContext) -> None:
    """Entry point of a training stage on every rank; never returns."""
    stop = StopFlag().install()  # before the process group exists: a signal during set-up is kept
    env = init_distributed(ctx.spec.train.device)
    code = 0
    try:
        if env.is_main:
            removed = ckpt.discard_foreign(ctx.dir.checkpoints, ctx.spec_hash)
            if removed:
                log.info("removed checkpoints of an earlier spec of this stage (steps %s)", removed)
        if dist.is_initialized():
            dist.barrier()
        trainer = Trainer(ctx, env, stop)
        summary = trainer.fit()
        trainer.export(summary)
    except StopRequested:
        code = EXIT_REQUEUE
    except (BadDataError, CheckpointError, PrecisionError) as exc:
        note_failure(ctx.dir, exc)
        log.error("%s", exc)
        code = 1
    except BaseException as exc:  # noqa: BLE001 - report, then exit with failure below
        named = note_failure(ctx.dir, exc, str(ctx.run_dir))
        if said_in_one_paragraph(named):
            log.error("%s", named[1])
        elif peer_lost(exc):
            log.error("stopping: another rank is gone (%s); its own lines above say why", str(exc).split(". ")[0])
        else:
            traceback.print_exc()
        code = 1
    exit_process(code)
