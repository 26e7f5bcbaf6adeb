"""What a pipeline asks of the cluster before it is queued: GPU-hours and
wall time per training stage, from the model FLOPs of one sample.

    wall time = FLOPs per sample x steps x batch / (GPUs x peak FLOP/s x MFU)
    GPU-hours = wall time x GPUs

FLOPs per sample come from ``train/model_flops.py`` at the padded text length
``max_text_len`` (real batches pad to their longest caption, so this is an
upper bound), the peak from ``train/device_peaks.py`` for the profile's GPU
(``gpu_name``, else ``gpu_type``) in the stage's precision, and the MFU from
the newest ``result.json`` of a finished training stage of the same model
shape on the same GPU and precision in this run directory or one beside it,
else :data:`DEFAULT_MFU` (``plan --mfu`` replaces it). The output says which.

Only training stages are estimated: an import, eval or merge has no FLOPs
model here (its size is only known once its data is), and ``plan`` lists
them as not estimated. Torch-free: ``plan`` runs on a login node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlcluster.graph import Graph
from vlcluster.errors import SpecError
from vlcluster.sizes import PRESETS, DerivedShape
from vlcluster.storage.paths import is_remote, read_json
from vlcluster.tasks.registry import TASKS
from vlcluster.train.device_peaks import peak_tflops
from vlcluster.train.model_flops import TRAIN_FACTOR, Objectives, StepShape, image_tokens, layers_forward, matmul, train_flops_per_sample

# A ViT-B-class model under FSDP in mixed precision commonly reaches 30-45% of
# the tensor-core peak; the low end, so an estimate errs towards asking for more.
DEFAULT_MFU = 0.30
# The fields of a model the FLOPs of one sample depend on (not its arch: experts are routed, not added).
SHAPE_FIELDS = ("dim", "depth", "heads", "vl_layers", "image_size", "patch_size", "mlp_ratio", "max_text_len")
CLS_AND_SEP = 2  # caption tokens MLM never masks


@dataclass(frozen=True)
class Mfu:
    value: float
    source: str  # where the value comes from, as the output prints it


@dataclass(frozen=True)
class StageEstimate:
    name: str
    gpus: int  # the whole stage: nodes x GPUs per node
    flops: float | None = None  # model FLOPs of the whole stage
    hours: float | None = None  # wall time
    gpu: str | None = None
    mfu: Mfu | None = None
    note: str = ""  # the route counted, or why nothing is estimated

    @property
    def gpu_hours(self) -> float | None:
        return None if self.hours is None else self.hours * self.gpus

    def to_json(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus, "gpu": self.gpu, "flops": self.flops, "wall_hours": self.hours,
            "gpu_hours": self.gpu_hours, "mfu": self.mfu.value if self.mfu else None,
            "mfu_source": self.mfu.source if self.mfu else None, "note": self.note,
        }


@dataclass(frozen=True)
class ModelShape(DerivedShape):
    """What ``model_flops.py`` reads of a ``ModelShape``, built without the model package (torch)."""

    dim: int
    depth: int
    heads: int
    vl_layers: int
    image_size: int
    patch_size: int
    mlp_ratio: float
    max_text_len: int
    itc_dim: int
    vocab_size: int
    num_answers: int

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def stage_model_config(graph: Graph, spec) -> ModelShape:
    """The model a training stage builds, as far as the spec fixes it (the
    vocabulary and answer list are the preset's: the data sets the real ones)."""
    model = spec.model
    fields = {**PRESETS[model.size], **model.overrides()}
    source = graph.pipeline.stages.get(spec.data.from_) if spec.data.from_ else None
    if model.image_size is None and getattr(source, "kind", None) == "data":
        fields["image_size"] = source.image_size
    return ModelShape(**{name: fields[name] for name in ModelShape.__dataclass_fields__})


def shape_key(fields: dict) -> tuple:
    return tuple(fields.get(name) for name in SHAPE_FIELDS)


def sample_flops(config: ModelShape, spec) -> tuple[float, str]:
    """Forward + backward FLOPs of one training sample and the route counted."""
    train, text = spec.train, config.max_text_len
    task = getattr(spec, "task", None)
    masked = max(train.mask_prob * (text - CLS_AND_SEP), 1.0)
    if task is None:
        objectives = Objectives.from_weights(train.loss_weights)
        shape = StepShape(text_len=text, rank_batch=0, global_batch=train.batch_size, masked_tokens=masked,
                          question_len=text if objectives.vqa else 0)
        routes = "+".join(name.upper() for name in ("itc", "itm", "mlm", "vqa") if getattr(objectives, name))
        return train_flops_per_sample(config, objectives, shape), routes
    entry = TASKS[task]
    flops, route = task_route_flops(config, entry.route, train.batch_size)
    # NLVR2: two images, each fused with the sentence
    return (entry.images * flops, f"{entry.images} x {route}") if entry.images > 1 else (flops, route)


def task_route_flops(config: ModelShape, route: str, batch_size: int) -> tuple[float, str]:
    """FLOPs of one image of a task sample through the task's route (``TaskEntry.route``)."""
    text = config.max_text_len
    if route == "fusion":
        shape = StepShape(text_len=0, rank_batch=0, global_batch=batch_size, question_len=text)
        return train_flops_per_sample(config, Objectives(False, False, False, True), shape), "VQA route"
    if route == "dual":
        shape = StepShape(text_len=text, rank_batch=0, global_batch=batch_size)
        return train_flops_per_sample(config, Objectives(True, True, False, False), shape), "ITC+ITM"
    # vision: the image through every layer; the task head is not counted
    patch = config.patch_size
    forward = matmul(config.num_patches, config.dim, 3 * patch * patch) + layers_forward(config, config.depth, image_tokens(config))
    return float(TRAIN_FACTOR * forward), "image encoder"


def stage_precision(spec, peaks_of: str) -> str:
    precision = spec.train.precision
    if precision != "auto":
        return precision
    return "bf16" if peak_tflops(peaks_of, "bf16") else "fp16"


def profile_gpu(spec) -> tuple[str | None, str]:
    """The GPU a stage runs on (by the name its peak is looked up with), or None and why not."""
    from vlcluster.backends.slurm.profile import load_profile, profile_name

    try:
        profile = load_profile(profile_name(spec))
    except SpecError as exc:
        return None, str(exc)
    name = profile.gpu_name or profile.gpu_type
    return name, "" if name else f"profile {profile_name(spec)!r} names no gpu_name or gpu_type"


class MfuRecords:
    """Measured MFU of finished training stages: run directories' ``result.json``
    (``throughput``: mfu, device, precision) beside the stage's ``model.json``."""

    def __init__(self, roots: list[Path]):
        self.records: list[tuple[float, tuple, str, str, float, Path]] = []  # mtime, shape, device, precision, mfu, file
        for root in roots:
            for result in sorted(root.glob("*/result.json")):
                record = self.read(result)
                if record:
                    self.records.append(record)
        self.records.sort(key=lambda record: record[0], reverse=True)  # newest first

    @staticmethod
    def read(result: Path) -> tuple | None:
        record, config = read_json(result), read_json(result.parent / "model.json")
        throughput = record.get("throughput") if isinstance(record, dict) else None
        if not isinstance(throughput, dict) or not isinstance(config, dict):
            return None
        mfu, device, precision = throughput.get("mfu"), throughput.get("device"), throughput.get("precision")
        if not (isinstance(mfu, float) and 0 < mfu <= 1 and isinstance(device, str) and isinstance(precision, str)):
            return None
        return result.stat().st_mtime, shape_key(config), device, precision, mfu, result

    def find(self, config: ModelShape, gpu: str, precision: str) -> Mfu | None:
        key = shape_key(config.to_dict())
        for _, shape, device, recorded_precision, mfu, result in self.records:
            if shape == key and recorded_precision == precision and gpu.casefold() in device.casefold():
                return Mfu(mfu, f"measured: {result}")
        return None


def mfu_roots(run_dir: Path) -> list[Path]:
    """This run directory and the ones beside it (``runs/*``); object stores are not listed."""
    if is_remote(str(run_dir)) or not run_dir.parent.is_dir():
        return []
    return sorted(path for path in run_dir.parent.iterdir() if path.is_dir())


def estimate_stage(graph: Graph, name: str, records: MfuRecords, default_mfu: float) -> StageEstimate:
    spec = graph.pipeline.stages[name]
    res = spec.resources
    gpus = res.nodes * res.gpus_per_node
    if getattr(spec, "train", None) is None or spec.kind not in {"pretrain", "finetune"}:
        return StageEstimate(name, gpus, note=f"not estimated (no FLOPs model for a {spec.kind} stage)")
    if gpus == 0:
        return StageEstimate(name, gpus, note="not estimated (no GPUs)")
    gpu, problem = profile_gpu(spec)
    if gpu is None:
        return StageEstimate(name, gpus, note=f"not estimated ({problem})")
    precision = stage_precision(spec, gpu)
    peak = peak_tflops(gpu, precision)
    if peak is None:
        return StageEstimate(name, gpus, gpu=gpu, note=f"not estimated (no {precision} peak known for GPU {gpu!r}; train/device_peaks.py)")
    config = stage_model_config(graph, spec)
    per_sample, route = sample_flops(config, spec)
    flops = per_sample * spec.train.steps * spec.train.batch_size
    mfu = records.find(config, gpu, precision) or Mfu(default_mfu, "default")
    hours = flops / (gpus * peak * 1e12 * mfu.value) / 3600
    note = f"{per_sample / 1e9:.0f} GFLOP/sample ({route}), {gpu} {precision} peak {peak:g} TFLOP/s"
    return StageEstimate(name, gpus, flops, hours, gpu, mfu, note)


def estimate(graph: Graph, run_dir: Path, default_mfu: float | None = None) -> dict[str, StageEstimate]:
    default_mfu = DEFAULT_MFU if default_mfu is None else default_mfu
    if not 0 < default_mfu <= 1:
        raise SpecError(f"--mfu must be in (0, 1], got {default_mfu}")
    records = MfuRecords(mfu_roots(Path(run_dir)))
    return {name: estimate_stage(graph, name, records, default_mfu) for name in graph.order}


def hours_text(hours: float | None) -> str:
    if hours is None:
        return "-"
    if hours >= 48:
        return f"{hours / 24:.1f} d"
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"


def gpu_hours_text(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def total_gpu_hours(estimates: dict[str, StageEstimate]) -> float:
    return math.fsum(e.gpu_hours for e in estimates.values() if e.gpu_hours is not None)


def jobs_of(graph: Graph, estimates: dict[str, StageEstimate], names: list[str] | None = None):
    """The stages as ``schedule.Job`` (an unestimated stage counts 0 hours)."""
    from vlcluster.schedule import Job

    chosen = [name for name in graph.order if names is None or name in names]
    families = submission_keys(graph, chosen)
    jobs = []
    for name in chosen:
        res = graph.pipeline.stages[name].resources
        hours = estimates[name].hours if name in estimates else None
        deps = tuple(dep for dep in graph.deps[name] if dep in families)
        jobs.append(Job(name, families[name], res.nodes * res.gpus_per_node, hours or 0.0, deps, res.max_concurrent))
    return jobs


def submission_keys(graph: Graph, names: list[str]) -> dict[str, str]:
    """Stage -> the SLURM submission (job or array) it belongs to (``schedule.unit_keys``)."""
    import json

    from vlcluster.schedule import unit_keys

    return unit_keys(names, lambda name: json.dumps(graph.pipeline.stages[name].resources.model_dump(), sort_keys=True),
                     lambda name: graph.deps[name])


def unestimated_bound(graph: Graph, estimates: dict[str, StageEstimate]) -> dict[str, Any]:
    """GPU stages without an estimate, by kind, and what their time limits allow them to hold."""
    from vlcluster.backends.slurm.profile import load_profile, profile_name

    kinds: dict[str, int] = {}
    hours = 0.0
    for name, e in estimates.items():
        if e.hours is None and e.gpus:
            spec = graph.pipeline.stages[name]
            kinds[spec.kind] = kinds.get(spec.kind, 0) + 1
            try:
                limit = spec.resources.time_min or load_profile(profile_name(spec)).time_min
            except SpecError:
                limit = 0
            hours += e.gpus * limit / 60
    return {"stages": sum(kinds.values()), "kinds": kinds, "gpu_hours": hours}


def summary(graph: Graph, estimates: dict[str, StageEstimate], source: str) -> dict[str, Any]:
    """Totals and the critical path, with unlimited GPUs and under ``limits.gpus``."""
    from vlcluster.schedule import CapError, critical_path, shape_for_cap

    jobs = jobs_of(graph, estimates)
    hours, chain = critical_path(jobs)
    estimated = [e for e in estimates.values() if e.hours is not None]
    mfu_sources = sorted({e.mfu.source for e in estimated if e.mfu})
    out: dict[str, Any] = {
        "gpu_hours": total_gpu_hours(estimates),
        "gpus": sorted({e.gpu for e in estimated if e.gpu}),
        "estimated": len(estimated),
        "not_estimated": [e.name for e in estimates.values() if e.hours is None],
        "mfu_sources": mfu_sources,
        "unestimated_gpu_hours_bound": unestimated_bound(graph, estimates),
        "critical_path": {"hours": hours, "stages": chain},
        "limits": None,
    }
    cap = graph.pipeline.limits.gpus
    if cap:
        try:
            shaped = shape_for_cap(jobs, cap)
        except CapError as exc:
            raise SpecError(f"{source}: {exc}") from None
        out["limits"] = {"gpus": cap, "hours": shaped.hours}
    return out
