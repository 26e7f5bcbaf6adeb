"""Where each evaluated model came from, read from a run's ``pipeline.json``.

An *arm* is one eval stage with the path of its model back to pre-training:
eval -> (finetune) -> (merge) -> (finetune, when a fine-tuned model was
merged) -> the pre-training stage -> (the seed stage it was initialised
from). From that path follow the facts the paper's tables are keyed by: the
architecture, K_seed and K_VL, whether and how the experts were merged.
Nothing is inferred from stage names.

Replicates are arms of one setting (same architecture, K_seed, K_VL, merge)
that differ in the seeds of their training stages (``train.seed``: initial
weights and data order), in one run or across runs. ``Arm.replicate`` is what
tells them apart; ``Arm.setting`` what they share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from vlcluster.merge.methods import SPECS
from vlcluster.stages.rundir import pipeline_file, read_json, stage_dir

# Result keys that are counts or details, not scores.
NOT_SCORES = {"vqa_questions", "retrieval_pairs", "retrieval_images", "retrieval_captions", "examples", "classes_present"}


class LineageError(ValueError):
    """A run directory whose records cannot be read as a pipeline."""


@dataclass(frozen=True)
class Merge:
    stage: str
    method: str
    params: dict[str, float]
    after_finetune: bool  # paper footnote 4: the fine-tuned modality-specific model was merged

    @property
    def knob(self) -> tuple[str, float] | None:
        spec = SPECS.get(self.method)  # the knob each method is swept over: merge/methods.py declares it
        name = spec.knob if spec else None
        value = self.params.get(name) if name else None
        return (name, value) if isinstance(value, (int, float)) else None

    def describe(self) -> str:
        knob = self.knob
        shown = f" {knob[0]}={knob[1]:g}" if knob else ""
        return f"{self.method}{shown}" + (" (fine-tuned, then merged)" if self.after_finetune else "")


@dataclass(frozen=True)
class Arm:
    run: str
    eval_stage: str
    scores: dict[str, float]
    arch: str | None  # architecture of the pre-trained model (before any merge)
    pretrain_stage: str | None
    k_seed: int | None  # seed (modality-agnostic) steps before the VL stage; 0 = merging baseline
    k_vl: int | None  # steps of the modality-specific stage (None for a modality-agnostic model)
    merge: Merge | None
    mergeability: dict[str, float] | None = field(default=None)  # metrics of the merged source
    pretrain_seeds: tuple[int, ...] = ()  # train.seed of the seed and VL stages (pre-training order)
    finetune_seeds: tuple[int, ...] = ()  # train.seed of the fine-tunes on the path (before and after a merge)
    items: dict[str, tuple[float, ...]] = field(default_factory=dict)  # per-item values of a score (its mean)

    @property
    def replicate(self) -> tuple:
        """Which replicate of its setting this arm is: its run and the seeds of its training stages."""
        return (self.run, self.pretrain_seeds, self.finetune_seeds)

    @property
    def pairing(self) -> tuple:
        """What pairs this arm with arms of other settings in the same replicate: its run and the
        seeds used (``replicates: N`` gives every training stage of replicate k the same seed)."""
        return (self.run, frozenset(self.pretrain_seeds + self.finetune_seeds))

    @property
    def setting(self) -> tuple:
        """What replicates of one another share (everything but run and seeds)."""
        return (self.role, self.arch, self.k_seed, self.k_vl, self.merge.describe() if self.merge else None)

    @property
    def role(self) -> str:
        """The paper's Table 1 row this arm belongs to."""
        if self.merge is not None:
            return "merging baseline" if self.k_seed == 0 else "merged"
        if self.arch == "agnostic":
            return "MAA"
        return "MSA" if self.arch == "specific" else f"{self.arch} (unmerged)"


def scores_of(result: dict) -> dict[str, float]:
    """The numeric scores of an eval result (finite floats and ints, no counts)."""
    return {
        key: float(value)
        for key, value in result.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NOT_SCORES and math.isfinite(value)
    }


def items_of(result: dict) -> dict[str, tuple[float, ...]]:
    """Per-item values an eval recorded (``items``: score -> list), the finite numeric lists only."""
    items = result.get("items")
    if not isinstance(items, dict):
        return {}
    return {
        name: tuple(float(v) for v in values)
        for name, values in items.items()
        if isinstance(values, list) and len(values) > 1
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    }


def read_pipeline(run_dir: str | Path) -> dict:
    record = read_json(pipeline_file(run_dir))
    if not isinstance(record, dict) or not isinstance(record.get("pipeline"), dict):
        raise LineageError(f"{pipeline_file(run_dir)}: not a vlcluster run directory (no readable pipeline.json)")
    stages = record["pipeline"].get("stages")
    if not isinstance(stages, dict) or not all(isinstance(spec, dict) for spec in stages.values()):
        raise LineageError(f"{pipeline_file(run_dir)}: field 'pipeline.stages' is not a mapping of stage specs")
    return record


class Lineage:
    """Walks the model references of one run's stages."""

    def __init__(self, stages: dict[str, dict]):
        self.stages = stages

    def kind(self, name: str | None) -> str | None:
        spec = self.stages.get(name) if name else None
        return spec.get("kind") if spec else None

    def model_source(self, name: str) -> str | None:
        """The stage whose model ``name`` starts from (None for a fresh model or an external checkpoint)."""
        spec = self.stages.get(name) or {}
        if spec.get("kind") in ("eval", "merge", "metrics", "grams"):
            return spec.get("source")
        init = spec.get("init")
        return init.get("from") if isinstance(init, dict) else None

    def steps(self, name: str) -> int | None:
        train = (self.stages.get(name) or {}).get("train") or {}
        steps = train.get("steps")
        return steps if isinstance(steps, int) else None

    def arch(self, name: str) -> str | None:
        model = (self.stages.get(name) or {}).get("model") or {}
        return model.get("arch")

    def seed_of(self, name: str | None) -> int | None:
        """``train.seed`` of a training stage (0 when not written, the default)."""
        train = (self.stages.get(name) or {}).get("train") if name else None
        seed = train.get("seed", 0) if isinstance(train, dict) else None
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def arm(self, run: str, eval_stage: str, result: dict) -> Arm:
        return self.arm_of_model(run, eval_stage, self.model_source(eval_stage), result)

    def arm_of_model(self, run: str, eval_stage: str, model: str | None, result: dict) -> Arm:
        """The lineage of ``model`` (a stage's name), as the eval stage ``eval_stage`` that read it would have."""
        finetunes: list[str] = []
        if self.kind(model) == "finetune":
            finetunes.append(model)
            model = self.model_source(model)
        merge = None
        if self.kind(model) == "merge":
            merged_from = self.model_source(model)
            after_finetune = self.kind(merged_from) == "finetune"
            merge = Merge(model, self.stages[model].get("method", "?"), self.merge_params(model), after_finetune)
            if after_finetune:
                finetunes.insert(0, merged_from)
            model = self.model_source(merged_from) if after_finetune else merged_from
        found = Arm(run, eval_stage, scores_of(result), None, None, None, None, merge,
                    finetune_seeds=tuple(self.seed_of(name) for name in finetunes), items=items_of(result))
        if self.kind(model) != "pretrain":
            return found
        arch = self.arch(model)
        if arch == "agnostic":
            return replace(found, arch=arch, pretrain_stage=model, k_seed=self.steps(model), pretrain_seeds=(self.seed_of(model),))
        seed = self.model_source(model)
        seeded = self.kind(seed) == "pretrain" and self.arch(seed) == "agnostic"
        k_seed = self.steps(seed) if seeded else 0
        seeds = (self.seed_of(seed), self.seed_of(model)) if seeded else (self.seed_of(model),)
        return replace(found, arch=arch, pretrain_stage=model, k_seed=k_seed, k_vl=self.steps(model), pretrain_seeds=seeds)

    def merge_params(self, name: str) -> dict[str, float]:
        spec = self.stages[name]
        return {key: value for key, value in spec.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}

    def metrics_stage_of(self, model_stage: str) -> str | None:
        for name, spec in self.stages.items():
            if spec.get("kind") == "metrics" and spec.get("source") == model_stage:
                return name
        return None


def run_label(run_dir: str | Path, record: dict) -> str:
    name = record["pipeline"].get("name")
    return str(name) if name else Path(str(run_dir)).name


def collect_arms(run_dirs: list[str | Path]) -> list[Arm]:
    """Every finished eval stage of every run, as an arm (unfinished ones are left out)."""
    arms: list[Arm] = []
    labels = [run_label(run_dir, read_pipeline(run_dir)) for run_dir in run_dirs]
    for run_dir, label in zip(run_dirs, labels):
        if labels.count(label) > 1:
            label = f"{label} ({Path(str(run_dir)).name})"
        arms.extend(arms_of_run(run_dir, label))
    return arms


def arms_of_run(run_dir: str | Path, label: str) -> list[Arm]:
    stages = read_pipeline(run_dir)["pipeline"]["stages"]
    lineage = Lineage(stages)
    arms = []
    for name, spec in stages.items():
        if spec.get("kind") != "eval":
            continue
        result = read_json(stage_dir(run_dir, name).result_file)
        if not isinstance(result, dict):
            continue
        arm = lineage.arm(label, name, result)
        if arm.merge is not None and arm.pretrain_stage:
            arm = with_mergeability(arm, run_dir, lineage)
        arms.append(arm)
    return arms


def with_mergeability(arm: Arm, run_dir: str | Path, lineage: Lineage) -> Arm:
    metrics_stage = lineage.metrics_stage_of(arm.pretrain_stage)
    result = read_json(stage_dir(run_dir, metrics_stage).result_file) if metrics_stage else None
    overall = result.get("overall") if isinstance(result, dict) else None
    if not isinstance(overall, dict):
        return arm
    return replace(arm, mergeability=scores_of(overall))
